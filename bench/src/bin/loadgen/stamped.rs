//! Batched receiving with the kernel's arrival time of each datagram (`SO_TIMESTAMPNS`).
//!
//! On loopback the kernel stamps a datagram when the sender hands it to the loopback device, that is
//! when the server (or forwarder) sends it on. Latency measured against that stamp is what the server
//! added, without the time the datagram then waits for this generator (busy sending its own schedule)
//! to read it.

use nix::sys::socket::{ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, setsockopt, sockopt};
use nix::sys::time::TimeSpec;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd};

/// Most datagrams one [`StampedBatch::recv`] call takes.
pub(crate) const BATCH: usize = 32;
/// Room for the largest datagram a relay here sends.
const BUF_LEN: usize = 2048;

/// Asks the kernel to stamp each datagram `socket` receives with its arrival time (wall clock).
pub(crate) fn enable(socket: &impl AsFd) -> io::Result<()> {
    setsockopt(socket, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)
}

/// Buffers and message headers for up to [`BATCH`] datagrams, allocated once.
pub(crate) struct StampedBatch {
    bufs: Vec<[u8; BUF_LEN]>,
    headers: MultiHeaders<SockaddrStorage>,
    /// Length and kernel arrival time (ns since the Unix epoch; `None`: not stamped) of each datagram
    /// of the last call.
    meta: [(usize, Option<u64>); BATCH],
}

impl StampedBatch {
    /// Empty buffers and headers with room for one timestamp each.
    pub(crate) fn new() -> Self {
        Self {
            bufs: vec![[0; BUF_LEN]; BATCH],
            headers: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(TimeSpec))),
            meta: [(0, None); BATCH],
        }
    }

    /// Receives what is waiting on `socket` without blocking; returns how many datagrams arrived
    /// (0: none, or an error: the caller only counts what arrives).
    pub(crate) fn recv(&mut self, socket: &impl AsFd) -> usize {
        let mut bufs = self.bufs.iter_mut();
        let mut slices: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| &mut b[..]))]);
        let Ok(results) =
            recvmmsg(socket.as_fd().as_raw_fd(), &mut self.headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
        else {
            return 0;
        };
        let mut n = 0;
        for (msg, meta) in results.zip(self.meta.iter_mut()) {
            let stamp = msg.cmsgs().ok().and_then(|mut cmsgs| {
                cmsgs.find_map(|c| match c {
                    ControlMessageOwned::ScmTimestampns(t) => {
                        u64::try_from(t.tv_sec()).ok().map(|s| s * 1_000_000_000 + t.tv_nsec() as u64)
                    }
                    _ => None,
                })
            });
            *meta = (msg.bytes, stamp);
            n += 1;
        }
        n
    }

    /// Datagram `i` of the last call and its kernel arrival time.
    pub(crate) fn get(&self, i: usize) -> (&[u8], Option<u64>) {
        let (len, stamp) = self.meta[i];
        (&self.bufs[i][..len.min(BUF_LEN)], stamp)
    }
}
