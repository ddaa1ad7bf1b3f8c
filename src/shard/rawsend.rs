//! Sending relayed datagrams of many allocations through one raw socket per address family.
//!
//! Every allocation has its own relay socket, because its datagrams must leave from its own relayed
//! address. With many allocations, each wake-up has one or two datagrams per relay socket, and
//! `sendmmsg(2)` batches only per socket: one system call per datagram. A raw socket
//! (`IPPROTO_RAW`, which takes the IP header from the caller and receives nothing) sends datagrams
//! with any source address and port, so they all leave in one `sendmmsg`: the shard writes each
//! datagram's IP and UDP header, with the relay socket's own address as the source, into the headroom
//! in front of the payload (nothing is copied). The relay socket stays bound, so the port stays
//! reserved and the peer's answers arrive there as before. The headers are plain: no IP options or
//! extension headers, traffic class 0, TTL or hop limit 64 (Linux's default), flow label 0, and no
//! don't-fragment bit on IPv4, so a router with a smaller MTU on the way fragments a large datagram
//! rather than dropping it. A datagram larger than the first hop's MTU is refused by the kernel (a raw
//! socket does not fragment) and leaves through its relay socket.
//!
//! Opening a raw socket needs `CAP_NET_RAW` (the server gives it up once the sockets are open).
//! Without it the shard sends through its relay sockets; `runtime.raw_send: false` never tries.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};

/// Bytes of the IPv4 header (no options) and the UDP header written in front of an IPv4 payload.
pub const HEADER_LEN_V4: usize = 20 + 8;
/// Bytes of the IPv6 header (no extension headers) and the UDP header in front of an IPv6 payload.
pub const HEADER_LEN_V6: usize = 40 + 8;
/// Time to live or hop limit of the datagrams (Linux's default).
const TTL: u8 = 64;
/// Largest UDP payload one datagram carries (IPv4: the total length is 16 bits; IPv6: the UDP length).
const MAX_PAYLOAD: usize = 65_535 - HEADER_LEN_V4;

/// The headers' length for a datagram of this family.
pub fn header_len(to: SocketAddr) -> usize {
    if to.is_ipv4() { HEADER_LEN_V4 } else { HEADER_LEN_V6 }
}

/// A shard's raw sockets for sending, one per address family where one opens.
#[derive(Debug)]
pub struct RawSocket {
    v4: Option<Socket>,
    v6: Option<Socket>,
    min_batch: usize,
}

impl RawSocket {
    /// Opens non-blocking `IPPROTO_RAW` sockets for IPv4 and IPv6 with `send_buffer` bytes of send
    /// buffer each (0: the kernel's default), to take the lone datagrams of a flush when there are at
    /// least `min_batch` of a family (see [`Self::min_batch`]). Succeeds when at least the IPv4 one
    /// opens (an IPv6 one needs a kernel with IPv6 and `IPV6_HDRINCL`, 4.5 or later); fails without
    /// `CAP_NET_RAW`.
    pub fn open(send_buffer: usize, min_batch: usize) -> io::Result<Self> {
        let open = |domain: Domain| -> io::Result<Socket> {
            let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            if domain == Domain::IPV6 {
                sock.set_header_included_v6(true)?;
            }
            sock.set_nonblocking(true)?;
            if send_buffer > 0 {
                sock.set_send_buffer_size(send_buffer)?;
            }
            Ok(sock)
        };
        let v4 = open(Domain::IPV4)?;
        let v6 = match open(Domain::IPV6) {
            Ok(sock) => Some(sock),
            Err(e) => {
                log::debug!("no IPv6 raw socket ({e}): relayed IPv6 datagrams leave through their relay sockets");
                None
            }
        };
        Ok(Self { v4: Some(v4), v6, min_batch: min_batch.max(1) })
    }

    /// The fewest lone datagrams of one family in a flush that leave through the raw socket; fewer
    /// leave through their relay sockets. The raw socket saves a system call per datagram but one, and
    /// each datagram it sends to an on-link peer costs the kernel a route of its own (a header-included
    /// datagram is routed as "next hop known", which the kernel does not cache towards a peer that is
    /// not behind a gateway), allocated and later freed through RCU in `ksoftirqd`, which then holds up
    /// the shard's core: a lone datagram alone in its flush gains nothing by it and would pay that.
    pub fn min_batch(&self) -> usize {
        self.min_batch
    }

    /// The socket for IPv4 datagrams (`v4`) or IPv6 ones, if one is open.
    pub fn fd(&self, v4: bool) -> Option<BorrowedFd<'_>> {
        if v4 { self.v4.as_ref() } else { self.v6.as_ref() }.map(AsFd::as_fd)
    }

    /// Whether datagrams to `to`'s family can leave through a raw socket.
    pub fn sends(&self, to: SocketAddr) -> bool {
        self.fd(to.is_ipv4()).is_some()
    }
}

/// The destination a raw socket is given for `to`: its address without the port (for IPv6 the kernel
/// reads a port there as the protocol number; for IPv4 it ignores it).
pub fn raw_destination(to: SocketAddr) -> SockAddr {
    let mut bare = to;
    bare.set_port(0);
    SockAddr::from(bare)
}

/// Writes the IP and UDP headers of a datagram from `from` to `to` (one family) into
/// `packet[..header_len(to)]`; the payload is the rest of `packet`. The UDP checksum is computed here;
/// on IPv4 the kernel fills in the identification and header checksum. Returns false, writing nothing,
/// when the families differ, `packet` is shorter than the headers or the payload is too large for one
/// datagram.
pub fn write_header(packet: &mut [u8], from: SocketAddr, to: SocketAddr) -> bool {
    let head = header_len(to);
    let Some(payload_len) = packet.len().checked_sub(head) else {
        return false;
    };
    if payload_len > MAX_PAYLOAD || from.is_ipv4() != to.is_ipv4() {
        return false;
    }
    let udp_len = (8 + payload_len) as u16;
    let proto = libc::IPPROTO_UDP as u8;
    let (ip, udp) = packet.split_at_mut(head - 8);
    // The pseudo-header's sum: source, destination, protocol, UDP length.
    let mut sum = u64::from(proto) + u64::from(udp_len);
    match (from.ip(), to.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            ip.fill(0);
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(udp_len + 20).to_be_bytes());
            ip[8] = TTL;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            sum += ones_complement_sum(&ip[12..20]);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            ip.fill(0);
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
            ip[6] = proto;
            ip[7] = TTL;
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            sum += ones_complement_sum(&ip[8..40]);
        }
        _ => return false,
    }
    udp[0..2].copy_from_slice(&from.port().to_be_bytes());
    udp[2..4].copy_from_slice(&to.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    sum += ones_complement_sum(udp);
    let checksum = !fold(sum);
    // A computed 0 is sent as its other form: 0 means "no checksum" over IPv4 and is invalid over IPv6.
    let checksum = if checksum == 0 { 0xffff } else { checksum };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    true
}

/// The one's complement sum of `bytes` as big-endian 16-bit words (an odd last byte padded with zero),
/// folded to 16 bits. It adds native-endian 32-bit words, which the compiler turns into vector
/// additions (big-endian words would need a byte swap each): 2^16 is 1 modulo 2^16 - 1, so 32-bit words
/// fold to the sum of their 16-bit halves, and the sum of byte-swapped words is the byte-swapped sum
/// (RFC 1071, section 2 B), so one swap at the end gives the big-endian sum. 1,208 bytes: 45 ns
/// against 79 ns with a swap per word.
fn ones_complement_sum(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(4);
    let mut sum: u64 = words.by_ref().map(|w| u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))).sum();
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum += u64::from(u32::from_ne_bytes(tail));
    // Native to big-endian: a swap on little-endian machines, nothing on big-endian ones.
    u64::from(u16::from_be(fold(sum)))
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

    /// The checksum by the textbook: the pseudo-header and the UDP bytes as 16-bit words, carries
    /// folded in as they happen.
    fn reference_checksum(from: SocketAddr, to: SocketAddr, udp: &[u8]) -> u16 {
        let octets = |ip: IpAddr| match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let mut bytes = octets(from.ip());
        bytes.extend(octets(to.ip()));
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

    /// Checks the UDP header at the start of `udp` (ports, length, checksum) of a `len`-byte payload.
    fn check_udp(udp: &[u8], from: SocketAddr, to: SocketAddr, len: usize) {
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), from.port());
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), to.port());
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]) as usize, 8 + len);
        let written = u16::from_be_bytes([udp[6], udp[7]]);
        let mut zeroed = udp.to_vec();
        zeroed[6..8].fill(0);
        assert_eq!(written, reference_checksum(from, to, &zeroed), "payload of {len} bytes");
    }

    #[test]
    fn ipv4_headers_carry_the_addresses_lengths_and_a_correct_checksum() {
        let from: SocketAddr = "192.0.2.10:49200".parse().unwrap();
        let to: SocketAddr = "198.51.100.7:5004".parse().unwrap();
        for len in [0usize, 1, 2, 3, 5, 160, 172, 1199, 1200] {
            let mut packet = vec![0u8; HEADER_LEN_V4 + len];
            for (i, b) in packet[HEADER_LEN_V4..].iter_mut().enumerate() {
                *b = (i * 7 + len) as u8;
            }
            assert!(write_header(&mut packet, from, to));
            assert_eq!(packet[0], 0x45);
            assert_eq!(u16::from_be_bytes([packet[2], packet[3]]) as usize, HEADER_LEN_V4 + len);
            assert_eq!((packet[8], packet[9]), (64, 17));
            assert_eq!(&packet[12..16], &[192, 0, 2, 10]);
            assert_eq!(&packet[16..20], &[198, 51, 100, 7]);
            check_udp(&packet[20..], from, to, len);
        }
    }

    #[test]
    fn ipv6_headers_carry_the_addresses_lengths_and_a_correct_checksum() {
        let from: SocketAddr = "[2001:db8::10]:49200".parse().unwrap();
        let to: SocketAddr = "[2001:db8:1::7]:5004".parse().unwrap();
        for len in [0usize, 1, 3, 172, 1199] {
            let mut packet = vec![0u8; HEADER_LEN_V6 + len];
            for (i, b) in packet[HEADER_LEN_V6..].iter_mut().enumerate() {
                *b = (i * 13 + len) as u8;
            }
            assert!(write_header(&mut packet, from, to));
            assert_eq!(&packet[0..4], &[0x60, 0, 0, 0], "version 6, traffic class and flow label 0");
            assert_eq!(u16::from_be_bytes([packet[4], packet[5]]) as usize, 8 + len, "payload length");
            assert_eq!((packet[6], packet[7]), (17, 64));
            assert_eq!(&packet[8..24], &"2001:db8::10".parse::<std::net::Ipv6Addr>().unwrap().octets());
            assert_eq!(&packet[24..40], &"2001:db8:1::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
            check_udp(&packet[40..], from, to, len);
        }
    }

    #[test]
    fn short_long_or_mixed_family_packets_are_refused_untouched() {
        let from: SocketAddr = "192.0.2.10:49200".parse().unwrap();
        let to: SocketAddr = "198.51.100.7:5004".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:5004".parse().unwrap();
        let mut short = [9u8; HEADER_LEN_V4 - 1];
        assert!(!write_header(&mut short, from, to));
        assert!(short.iter().all(|&b| b == 9));
        let mut long = vec![9u8; HEADER_LEN_V4 + MAX_PAYLOAD + 1];
        assert!(!write_header(&mut long, from, to));
        assert!(long.iter().all(|&b| b == 9));
        let mut mixed = vec![9u8; HEADER_LEN_V6 + 10];
        assert!(!write_header(&mut mixed, from, v6));
        assert!(!write_header(&mut mixed, v6, to));
        assert!(mixed.iter().all(|&b| b == 9));
        let mut largest = vec![0u8; HEADER_LEN_V4 + MAX_PAYLOAD];
        assert!(write_header(&mut largest, from, to));
    }

    #[test]
    fn raw_destinations_carry_no_port() {
        let v4: SocketAddr = "192.0.2.1:5004".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:5004".parse().unwrap();
        assert_eq!(raw_destination(v4).as_socket(), Some("192.0.2.1:0".parse().unwrap()));
        assert_eq!(raw_destination(v6).as_socket(), Some("[2001:db8::1]:0".parse().unwrap()));
    }
}
