//! The relay path's system calls: `recvmmsg(2)`, `sendmmsg(2)` with a control message per datagram
//! (which neither the standard library, socket2 nor nix wraps usably: nix's `sendmmsg` shares one set
//! of control messages across all datagrams, and counting what it sent reads address storage the
//! kernel never wrote) and `sendto(2)`; and one `prctl(2)`.
//!
//! They go to the kernel through `syscall(2)` rather than glibc's wrappers: those wrappers are thread
//! cancellation points and switch asynchronous cancellation on and off around every call, which a
//! process that never cancels a thread does not need; that bookkeeping was 1.2 % of a shard's cycles
//! relaying 100k datagrams/s (`perf record`, see bench/README.md).
//!
//! This is the crate's only `unsafe` code outside tests: building the headers is safe (plain pointers
//! to borrowed memory); each system call is one unsafe block, with its safety argument. Addresses the
//! kernel writes are read back from plain bytes, without unsafe code. Also here, through libc:
//! `prctl(PR_SET_TIMERSLACK)` for the receive-coalescing pause (once per shard, off the relay path).

#![allow(unsafe_code)]

use socket2::SockAddr;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most messages one call takes.
pub(crate) const MAX_MESSAGES: usize = 64;
/// Most datagrams one [`RecvHeaders::recv`] call takes.
pub(crate) const MAX_RECV: usize = 32;

/// `SOL_UDP` / `UDP_SEGMENT` (linux/udp.h): the segment size of a GSO send.
const UDP_SEGMENT: libc::c_int = 103;
/// `CMSG_ALIGN(sizeof(struct cmsghdr))`.
const CMSG_HEADER: usize = size_of::<libc::cmsghdr>().next_multiple_of(size_of::<usize>());
/// `CMSG_LEN(sizeof(u16))`.
const CMSG_LEN: usize = CMSG_HEADER + size_of::<u16>();
/// `CMSG_SPACE(sizeof(u16))`.
const CMSG_SPACE: usize = CMSG_HEADER + size_of::<u16>().next_multiple_of(size_of::<usize>());

/// One outgoing message: the bytes of `iov` concatenated, to `to`; with `segment > 0` the kernel cuts
/// it into datagrams of `segment` bytes (the last may be shorter): UDP generic segmentation offload.
#[derive(Debug)]
pub(crate) struct Outgoing<'a> {
    /// Destination.
    pub to: &'a SockAddr,
    /// The bytes, gathered from these slices.
    pub iov: &'a [IoSlice<'a>],
    /// Segment size for GSO; 0 sends one datagram.
    pub segment: u16,
}

/// A control-message buffer aligned as `struct cmsghdr` requires.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; CMSG_SPACE]);

impl CmsgBuf {
    /// `SOL_UDP`/`UDP_SEGMENT` carrying `segment`, laid out as the kernel reads `struct cmsghdr`
    /// (`cmsg_len` is a `size_t`; on little- and big-endian alike, writing it as a native `usize` is
    /// what C does).
    fn gso(segment: u16) -> Self {
        let mut buf = [0u8; CMSG_SPACE];
        let word = size_of::<usize>();
        let int = size_of::<libc::c_int>();
        buf[..word].copy_from_slice(&CMSG_LEN.to_ne_bytes());
        buf[word..word + int].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
        buf[word + int..word + 2 * int].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
        buf[CMSG_HEADER..CMSG_HEADER + 2].copy_from_slice(&segment.to_ne_bytes());
        Self(buf)
    }
}

/// Sends up to [`MAX_MESSAGES`] of `msgs` on `fd` without blocking; returns how many the kernel took
/// (fewer than given when the next one met an error, which a call starting there reports).
pub(crate) fn send_batch(fd: BorrowedFd<'_>, msgs: &[Outgoing<'_>]) -> io::Result<usize> {
    let n = msgs.len().min(MAX_MESSAGES);
    if n == 0 {
        return Ok(0);
    }
    let mut cmsgs = [CmsgBuf([0; CMSG_SPACE]); MAX_MESSAGES];
    // SAFETY: `mmsghdr` is a C struct of integers and raw pointers, for which all-zero bytes are a valid
    // value (null pointers, zero lengths, no flags).
    let mut headers: [libc::mmsghdr; MAX_MESSAGES] = unsafe { std::mem::zeroed() };
    for ((header, msg), cmsg) in headers.iter_mut().zip(&msgs[..n]).zip(cmsgs.iter_mut()) {
        let hdr = &mut header.msg_hdr;
        hdr.msg_name = msg.to.as_ptr().cast_mut().cast();
        hdr.msg_namelen = msg.to.len();
        // `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix.
        hdr.msg_iov = msg.iov.as_ptr().cast_mut().cast();
        hdr.msg_iovlen = msg.iov.len() as _;
        if msg.segment > 0 {
            *cmsg = CmsgBuf::gso(msg.segment);
            hdr.msg_control = cmsg.0.as_mut_ptr().cast();
            hdr.msg_controllen = CMSG_SPACE as _;
        }
    }
    // SAFETY: the first `n` headers point only to memory that outlives this call and is not touched
    // during it: addresses and byte slices borrowed from `msgs` (with their true lengths) and the
    // control buffers in `cmsgs` (with their true length). The kernel reads them and writes only each
    // header's `msg_len`, inside `headers`, which `n` does not exceed.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_sendmmsg,
            libc::c_long::from(fd.as_raw_fd()),
            headers.as_mut_ptr(),
            n as libc::c_long,
            libc::c_long::from(libc::MSG_DONTWAIT),
        )
    };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(sent as usize) }
}

/// Sends `bytes` as one datagram to `to` on `fd` without blocking; returns the bytes sent.
pub(crate) fn send_to(fd: BorrowedFd<'_>, bytes: &[u8], to: &SockAddr) -> io::Result<usize> {
    // SAFETY: the kernel reads `bytes.len()` bytes from `bytes` and `to.len()` bytes of address from
    // `to`, both borrowed for the whole call, and writes no memory of ours.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(fd.as_raw_fd()),
            bytes.as_ptr(),
            bytes.len(),
            libc::c_long::from(libc::MSG_DONTWAIT),
            to.as_ptr(),
            libc::c_long::from(to.len()),
        )
    };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(sent as usize) }
}

/// Room for one source address written by the kernel (`struct sockaddr_storage`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
struct AddrBuf([u8; size_of::<libc::sockaddr_storage>()]);

impl Default for AddrBuf {
    fn default() -> Self {
        Self([0; size_of::<libc::sockaddr_storage>()])
    }
}

impl AddrBuf {
    /// The address in the first `len` bytes, laid out as Linux's `sockaddr_in` (family, port in
    /// network order, address) or `sockaddr_in6` (family, port, flow label, address, scope id).
    fn parse(&self, len: usize) -> Option<SocketAddr> {
        let b = &self.0[..len.min(self.0.len())];
        let family = i32::from(u16::from_ne_bytes([*b.first()?, *b.get(1)?]));
        let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
        let word = |at: usize| -> Option<[u8; 4]> { b.get(at..at + 4)?.try_into().ok() };
        match family {
            libc::AF_INET => Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(word(4)?), port))),
            libc::AF_INET6 => {
                let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
                let flow = u32::from_be_bytes(word(4)?);
                let scope = u32::from_ne_bytes(word(24)?);
                Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope)))
            }
            _ => None,
        }
    }
}

/// Message headers and source-address buffers for `recvmmsg`, kept between calls so a call only fills
/// in what it uses.
pub(crate) struct RecvHeaders {
    headers: [libc::mmsghdr; MAX_RECV],
    names: [AddrBuf; MAX_RECV],
}

impl std::fmt::Debug for RecvHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecvHeaders")
    }
}

impl Default for RecvHeaders {
    fn default() -> Self {
        // SAFETY: as in `send_batch`: all-zero bytes are a valid `mmsghdr` (no control buffer, which
        // stays so: `recv` sets only the address and data pointers and lengths).
        let headers = unsafe { std::mem::zeroed() };
        Self { headers, names: [AddrBuf::default(); MAX_RECV] }
    }
}

impl RecvHeaders {
    /// Receives up to `bufs.len()` (at most [`MAX_RECV`]) datagrams waiting on `fd` without blocking,
    /// one per buffer; writes each one's length and source to `meta` and returns how many arrived
    /// (0: none). A datagram longer than its buffer is cut to the buffer (the caller's buffers hold
    /// the largest).
    pub(crate) fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [(usize, Option<SocketAddr>)],
    ) -> io::Result<usize> {
        let n = bufs.len().min(MAX_RECV).min(meta.len());
        if n == 0 {
            return Ok(0);
        }
        for ((header, buf), name) in self.headers.iter_mut().zip(bufs[..n].iter_mut()).zip(self.names.iter_mut()) {
            let hdr = &mut header.msg_hdr;
            hdr.msg_name = name.0.as_mut_ptr().cast();
            hdr.msg_namelen = name.0.len() as libc::socklen_t;
            // `IoSliceMut` is guaranteed ABI-compatible with `struct iovec` on Unix.
            hdr.msg_iov = std::ptr::from_mut(buf).cast();
            hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `n` headers, just set, point only to memory exclusively borrowed for this
        // call: one buffer of `bufs` each (with its true length, through its `iovec`) and one address
        // buffer of `self.names` each (with its true length); they have no control buffer. The kernel
        // writes at most those lengths there, and each header's `msg_len`, `msg_namelen` and
        // `msg_flags` inside `self.headers`; no timeout is passed.
        let got = unsafe {
            libc::syscall(
                libc::SYS_recvmmsg,
                libc::c_long::from(fd.as_raw_fd()),
                self.headers.as_mut_ptr(),
                n as libc::c_long,
                libc::c_long::from(libc::MSG_DONTWAIT),
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        let got = (got as usize).min(n);
        for ((slot, header), name) in meta.iter_mut().zip(&self.headers[..got]).zip(&self.names) {
            *slot = (header.msg_len as usize, name.parse(header.msg_hdr.msg_namelen as usize));
        }
        Ok(got)
    }
}

/// Sets this thread's timer slack (how late the kernel may wake a sleeping thread) in nanoseconds.
pub(crate) fn set_timer_slack(ns: u64) -> bool {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) == 0 }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests wait for loopback delivery
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// The configuration's bound on `runtime.raw_min_batch` is what one call carries.
    #[test]
    fn the_configured_batch_limit_is_the_call_limit() {
        assert_eq!(crate::config::MAX_RAW_BATCH, MAX_MESSAGES);
    }

    #[test]
    fn plain_and_segmented_messages_in_one_call() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let to = SockAddr::from(rx.local_addr().unwrap());
        let (a, b, c) = ([1u8; 100], [2u8; 100], [3u8; 30]);
        let one = [IoSlice::new(b"first")];
        let three = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        let last = [IoSlice::new(b"last")];
        let msgs = [
            Outgoing { to: &to, iov: &one, segment: 0 },
            Outgoing { to: &to, iov: &three, segment: 100 },
            Outgoing { to: &to, iov: &last, segment: 0 },
        ];
        assert_eq!(send_batch(tx.as_fd(), &msgs).unwrap(), 3);
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
            if got.len() == 5 {
                break;
            }
        }
        assert_eq!(got, vec![b"first".to_vec(), a.to_vec(), b.to_vec(), c.to_vec(), b"last".to_vec()]);
    }

    #[test]
    fn addresses_are_read_as_the_kernel_writes_them() {
        for addr in ["192.0.2.7:3478", "[2001:db8::5]:49152", "[fe80::1%7]:5000"] {
            let want: SocketAddr = addr.parse().unwrap();
            let name = SockAddr::from(want);
            let mut buf = AddrBuf::default();
            // SAFETY: reads `name.len()` initialised bytes of the address socket2 built.
            let bytes = unsafe { std::slice::from_raw_parts(name.as_ptr().cast::<u8>(), name.len() as usize) };
            buf.0[..bytes.len()].copy_from_slice(bytes);
            assert_eq!(buf.parse(bytes.len()), Some(want), "{addr}");
            assert_eq!(buf.parse(3), None, "{addr}: cut short");
        }
        let mut unknown = AddrBuf::default();
        unknown.0[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(unknown.parse(16), None);
    }

    #[test]
    fn control_message_layout_matches_the_c_macros() {
        // SAFETY: pure arithmetic macros.
        let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
        assert_eq!((CMSG_SPACE, CMSG_LEN), (space, len));
    }
}
