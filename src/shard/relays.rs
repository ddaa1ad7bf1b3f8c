//! The shard's relay sockets: the engine opens, closes, parks and unparks them through
//! [`RelaySockets`], and the event loop finds them by allocation slot.

use super::socket::{self, Buffers};
use super::{PARKED_BASE, RELAY_BASE};
use crate::kernel_path::ShardMaps;
use crate::kernel_path::table::ShardTable;
use crate::proto::allocation::{FiveTuple, RelayKey, Traffic, Transport};
use crate::proto::engine::{BindError, RelaySockets};
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use std::io;
use std::net::SocketAddr;

/// The shard's relay sockets, indexed by allocation slot.
pub(super) struct RelaySlots {
    pub(super) registry: Registry,
    pub(super) sockets: Vec<Option<UdpSocket>>,
    /// How often each key has been opened: queued datagrams name the opening they belong to.
    pub(super) generations: Vec<u32>,
    /// The address each relay socket is bound to, the source address of its datagrams when they leave
    /// through a raw socket.
    pub(super) locals: Vec<Option<SocketAddr>>,
    pub(super) buffers: Buffers,
    /// Stream clients whose allocation was deleted: their connections are closed next.
    pub(super) freed_streams: Vec<FiveTuple>,
    /// Relay sockets out of service, kept open for later allocations (the engine's spares), with the
    /// address each is bound to.
    pub(super) parked: Vec<Option<(UdpSocket, SocketAddr)>>,
    /// Free entries of `parked`.
    pub(super) parked_free: Vec<u32>,
    /// The shard's entries in the kernel path's maps, when it runs (`runtime.kernel_path`).
    pub(super) kernel: Option<ShardTable<ShardMaps>>,
}

impl RelaySlots {
    /// Makes `sock` (registered with `key`'s token, bound to `local`) the relay socket `key`: a new
    /// opening, so datagrams queued for the key's previous socket are not sent from this one.
    pub(super) fn install(&mut self, key: RelayKey, sock: UdpSocket, local: SocketAddr) {
        let idx = key.index();
        if self.sockets.len() <= idx {
            self.sockets.resize_with(idx + 1, || None);
            self.generations.resize(idx + 1, 0);
            self.locals.resize(idx + 1, None);
        }
        self.sockets[idx] = Some(sock);
        self.generations[idx] = self.generations[idx].wrapping_add(1);
        self.locals[idx] = Some(local);
    }
}

impl RelaySockets for RelaySlots {
    fn open(&mut self, key: RelayKey, addr: SocketAddr) -> Result<(), BindError> {
        // Failures are logged by the engine, which limits how often.
        let failed = |e: io::Error| BindError::Failed(e.raw_os_error().unwrap_or(0));
        let std_socket = socket::relay_udp(addr, self.buffers)
            .map_err(|e| if e.kind() == io::ErrorKind::AddrInUse { BindError::AddrInUse } else { failed(e) })?;
        let mut sock = UdpSocket::from_std(std_socket);
        let token = Token(RELAY_BASE + key.index());
        self.registry.register(&mut sock, token, Interest::READABLE).map_err(failed)?;
        self.install(key, sock, addr);
        Ok(())
    }

    fn close(&mut self, key: RelayKey) {
        // Dropping the socket closes its only descriptor (relay sockets are never duplicated), which
        // removes it from the epoll interest list (epoll(7)); mio keeps no state per source on Linux.
        // A separate EPOLL_CTL_DEL would cost a system call per deleted allocation for nothing.
        drop(self.sockets.get_mut(key.index()).and_then(Option::take));
    }

    fn park(&mut self, key: RelayKey) -> Option<u32> {
        // Every installed socket has its address (`install`).
        let local = self.locals.get(key.index()).copied().flatten()?;
        let mut sock = self.sockets.get_mut(key.index()).and_then(Option::take)?;
        let id = match self.parked_free.pop() {
            Some(id) => id,
            None => {
                self.parked.push(None);
                (self.parked.len() - 1) as u32
            }
        };
        // Its own token from now on: what still arrives is read and dropped (`Shard::drain_batch`),
        // and a new allocation under `key` cannot receive its events.
        if self.registry.reregister(&mut sock, Token(PARKED_BASE + id as usize), Interest::READABLE).is_err() {
            self.parked_free.push(id);
            return None;
        }
        self.parked[id as usize] = Some((sock, local));
        Some(id)
    }

    fn unpark(&mut self, spare: u32, key: RelayKey) -> Result<(), BindError> {
        let (mut sock, local) =
            self.parked.get_mut(spare as usize).and_then(Option::take).ok_or(BindError::Failed(0))?;
        self.parked_free.push(spare);
        let token = Token(RELAY_BASE + key.index());
        self.registry
            .reregister(&mut sock, token, Interest::READABLE)
            .map_err(|e| BindError::Failed(e.raw_os_error().unwrap_or(0)))?;
        self.install(key, sock, local);
        Ok(())
    }

    fn offload_ended(&mut self, slot: u32) -> [Traffic; 2] {
        self.kernel.as_mut().map_or([Traffic::default(); 2], |k| k.end(slot))
    }

    fn allocation_freed(&mut self, tuple: FiveTuple) {
        if tuple.transport != Transport::Udp {
            self.freed_streams.push(tuple);
        }
    }
}
