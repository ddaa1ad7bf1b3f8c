//! `sendmmsg(2)` with a control message per datagram: the one system call that neither the standard
//! library, socket2 nor nix wraps usably here (nix's `sendmmsg` shares one set of control messages
//! across all datagrams, and counting what it sent reads address storage the kernel never wrote).
//!
//! This is the crate's only `unsafe` code outside tests: building the headers is safe (plain pointers
//! to borrowed memory); the system call itself is the one unsafe block, with its safety argument.

#![allow(unsafe_code)]

use socket2::SockAddr;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most messages one call takes.
pub const MAX_MESSAGES: usize = 64;

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
pub struct Outgoing<'a> {
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
pub fn send_batch(fd: BorrowedFd<'_>, msgs: &[Outgoing<'_>]) -> io::Result<usize> {
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
    let sent = unsafe { libc::sendmmsg(fd.as_raw_fd(), headers.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(sent as usize) }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests wait for loopback delivery
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Duration;

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
    fn control_message_layout_matches_the_c_macros() {
        // SAFETY: pure arithmetic macros.
        let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
        assert_eq!((CMSG_SPACE, CMSG_LEN), (space, len));
    }
}
