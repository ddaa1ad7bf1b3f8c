//! A shard's share of the kernel path's maps: it makes the entries of each allocation slot say what
//! the engine allows ([`turnpike_proto::Engine::offload_wanted`]) and hands the program's counts
//! back to the engine.
//!
//! Each shard writes only its own allocations' entries (one `bpf()` call per change, on the control
//! path of a ChannelBind, a permission or channel ending, a reload, a deletion; never per datagram).

use super::maps::{self, ChannelKey, ChannelValue, PeerKey};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use turnpike_proto::allocation::Traffic;
use turnpike_proto::engine::OffloadChannel;

/// The map operations a [`ShardTable`] needs (the kernel's maps, or memory in tests).
pub trait ChannelMaps {
    /// Adds a channel: its entry and its reverse (peer) entry. Fails when the map is full or the
    /// entry exists (another shard's allocation with the same client address, port and channel).
    fn insert(&mut self, key: &ChannelKey, value: &ChannelValue, peer: &PeerKey) -> io::Result<()>;
    /// Removes a channel's two entries (the reverse first, so no peer datagram finds half of it).
    fn remove(&mut self, key: &ChannelKey, peer: &PeerKey);
    /// The channel's entry as the program left it (its counters).
    fn read(&self, key: &ChannelKey) -> Option<ChannelValue>;
    /// The program's own counts (every CPU), when this handle reads them: [to peer, to client, no
    /// route].
    fn program_stats(&self) -> Option<[u64; 3]> {
        None
    }
}

/// One channel this shard installed.
#[derive(Debug, Clone, Copy)]
struct Installed {
    key: ChannelKey,
    peer: PeerKey,
    value: ChannelValue,
    /// The program's counts already handed to the engine.
    credited: [Traffic; 2],
}

/// What a shard installed, by allocation slot.
#[derive(Debug)]
pub struct ShardTable<M> {
    maps: M,
    slots: HashMap<u32, Vec<Installed>>,
    /// The local address of each UDP listener of the shard, by listener index.
    listeners: Vec<SocketAddr>,
    wanted: Vec<OffloadChannel>,
    /// Whether a failed insert was logged (once per shard: a full map stays full for a while).
    insert_failure_logged: bool,
}

/// New counts of an installed channel since `credited`, [to peer, to client].
fn fresh_counts(value: &ChannelValue, credited: &[Traffic; 2]) -> [Traffic; 2] {
    let now = [
        Traffic { packets: value.to_peer_packets, bytes: value.to_peer_bytes },
        Traffic { packets: value.to_client_packets, bytes: value.to_client_bytes },
    ];
    [0, 1].map(|d| Traffic {
        packets: now[d].packets.saturating_sub(credited[d].packets),
        bytes: now[d].bytes.saturating_sub(credited[d].bytes),
    })
}

fn add(sum: &mut [Traffic; 2], more: [Traffic; 2]) {
    for (s, m) in sum.iter_mut().zip(more) {
        s.packets += m.packets;
        s.bytes += m.bytes;
    }
}

impl<M: ChannelMaps> ShardTable<M> {
    /// A table writing into `maps` for a shard whose UDP listeners are bound to `listeners`.
    pub fn new(maps: M, listeners: Vec<SocketAddr>) -> Self {
        Self { maps, slots: HashMap::new(), listeners, wanted: Vec::new(), insert_failure_logged: false }
    }

    /// The program's own counts, when this shard reports them ([`ChannelMaps::program_stats`]).
    pub fn program_stats(&self) -> Option<[u64; 3]> {
        self.maps.program_stats()
    }

    /// Channels installed (all slots).
    pub fn installed(&self) -> usize {
        self.slots.values().map(Vec::len).sum()
    }

    /// The buffer [`ShardTable::sync`] takes the engine's answer in (lent out to avoid allocating).
    pub fn wanted_buffer(&mut self) -> Vec<OffloadChannel> {
        std::mem::take(&mut self.wanted)
    }

    /// Makes slot `slot`'s entries exactly `wanted` (what the engine allows now); returns the counts
    /// of the entries it removed that the engine has not had yet. `wanted` is handed back for reuse.
    pub fn sync(&mut self, slot: u32, wanted: Vec<OffloadChannel>) -> [Traffic; 2] {
        let mut counts = [Traffic::default(); 2];
        let desired: Vec<(ChannelKey, ChannelValue, PeerKey)> = wanted
            .iter()
            .filter_map(|c| {
                let server = *self.listeners.get(usize::from(c.client.listener.0))?;
                Some(maps::entries(c.client.client, server, c.number, c.peer, c.relay))
            })
            .collect();
        self.wanted = wanted;
        let mut installed = self.slots.remove(&slot).unwrap_or_default();
        installed.retain(|e| {
            let keep = desired.iter().any(|(k, v, p)| *k == e.key && *p == e.peer && v.same_route(&e.value));
            if !keep {
                if let Some(value) = self.maps.read(&e.key) {
                    add(&mut counts, fresh_counts(&value, &e.credited));
                }
                self.maps.remove(&e.key, &e.peer);
            }
            keep
        });
        for (key, value, peer) in desired {
            if installed.iter().any(|e| e.key == key) {
                continue;
            }
            match self.maps.insert(&key, &value, &peer) {
                Ok(()) => installed.push(Installed { key, peer, value, credited: [Traffic::default(); 2] }),
                Err(e) => {
                    if !self.insert_failure_logged {
                        self.insert_failure_logged = true;
                        log::warn!("kernel path: a channel stays in user space ({e}); further failures are not logged");
                    }
                }
            }
        }
        if !installed.is_empty() {
            self.slots.insert(slot, installed);
        }
        counts
    }

    /// Removes every entry of slot `slot` (its allocation is being deleted) and returns their counts
    /// the engine has not had yet.
    pub fn end(&mut self, slot: u32) -> [Traffic; 2] {
        let mut counts = [Traffic::default(); 2];
        for e in self.slots.remove(&slot).unwrap_or_default() {
            if let Some(value) = self.maps.read(&e.key) {
                add(&mut counts, fresh_counts(&value, &e.credited));
            }
            self.maps.remove(&e.key, &e.peer);
        }
        counts
    }

    /// Reads every installed channel's counts and calls `credit(slot, to_peer, to_client)` with what
    /// is new since the last call, for the slots with news.
    pub fn collect(&mut self, mut credit: impl FnMut(u32, Traffic, Traffic)) {
        for (slot, entries) in &mut self.slots {
            let mut counts = [Traffic::default(); 2];
            for e in entries.iter_mut() {
                let Some(value) = self.maps.read(&e.key) else { continue };
                let fresh = fresh_counts(&value, &e.credited);
                add(&mut counts, fresh);
                add(&mut e.credited, fresh);
            }
            if counts.iter().any(|t| t.packets > 0) {
                credit(*slot, counts[0], counts[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnpike_proto::allocation::{FiveTuple, ListenerId, Transport};

    /// The maps in memory, with the program's counters set by the test.
    #[derive(Default)]
    struct Memory {
        channels: HashMap<ChannelKey, ChannelValue>,
        peers: HashMap<PeerKey, ChannelKey>,
        full: bool,
    }

    impl ChannelMaps for Memory {
        fn insert(&mut self, key: &ChannelKey, value: &ChannelValue, peer: &PeerKey) -> io::Result<()> {
            if self.full || self.channels.contains_key(key) {
                return Err(io::Error::other("full"));
            }
            self.channels.insert(*key, *value);
            self.peers.insert(*peer, *key);
            Ok(())
        }
        fn remove(&mut self, key: &ChannelKey, peer: &PeerKey) {
            self.peers.remove(peer);
            self.channels.remove(key);
        }
        fn read(&self, key: &ChannelKey) -> Option<ChannelValue> {
            self.channels.get(key).copied()
        }
    }

    fn channel(number: u16, peer: &str) -> OffloadChannel {
        OffloadChannel {
            client: FiveTuple {
                client: "192.0.2.7:40000".parse().unwrap(),
                listener: ListenerId(0),
                transport: Transport::Udp,
            },
            number,
            peer: peer.parse().unwrap(),
            relay: "203.0.113.1:50000".parse().unwrap(),
        }
    }

    fn table() -> ShardTable<Memory> {
        ShardTable::new(Memory::default(), vec!["203.0.113.1:3478".parse().unwrap()])
    }

    #[test]
    fn sync_installs_keeps_and_removes_with_the_counts() {
        let mut t = table();
        let counts = t.sync(3, vec![channel(0x4000, "198.51.100.1:5000"), channel(0x4001, "198.51.100.2:5000")]);
        assert_eq!(counts, [Traffic::default(); 2]);
        assert_eq!((t.installed(), t.maps.channels.len(), t.maps.peers.len()), (2, 2, 2));
        for v in t.maps.channels.values_mut() {
            v.to_peer_packets = 3;
            v.to_peer_bytes = 300;
            v.to_client_packets = 1;
            v.to_client_bytes = 10;
        }
        let mut credited = Vec::new();
        t.collect(|slot, up, down| credited.push((slot, up.packets, up.bytes, down.packets)));
        assert_eq!(credited, vec![(3, 6, 600, 2)]);
        // Nothing new: no credit.
        t.collect(|_, _, _| panic!("nothing new was relayed"));
        // The second channel's permission ended: only its entries go, with what it relayed since.
        for v in t.maps.channels.values_mut() {
            v.to_peer_packets += 1;
        }
        let counts = t.sync(3, vec![channel(0x4000, "198.51.100.1:5000")]);
        assert_eq!(counts[0].packets, 1);
        assert_eq!((t.installed(), t.maps.channels.len(), t.maps.peers.len()), (1, 1, 1));
        let counts = t.end(3);
        assert_eq!(counts[0].packets, 1);
        assert_eq!((t.installed(), t.maps.channels.len(), t.maps.peers.len()), (0, 0, 0));
    }

    #[test]
    fn a_channel_rebound_elsewhere_is_replaced_and_a_full_map_leaves_it_in_user_space() {
        let mut t = table();
        let _ = t.sync(1, vec![channel(0x4000, "198.51.100.1:5000")]);
        let _ = t.sync(1, vec![channel(0x4000, "198.51.100.1:5001")]);
        assert_eq!(t.maps.channels.len(), 1);
        let value = t.maps.channels.values().next().copied().unwrap();
        assert_eq!(
            value,
            maps::entries(
                channel(0, "0.0.0.0:0").client.client,
                "203.0.113.1:3478".parse().unwrap(),
                0x4000,
                "198.51.100.1:5001".parse().unwrap(),
                "203.0.113.1:50000".parse().unwrap()
            )
            .1
        );
        t.maps.full = true;
        let _ = t.sync(2, vec![channel(0x4002, "198.51.100.3:5000")]);
        assert_eq!(t.installed(), 1, "the failed insert is not recorded as installed");
        assert_eq!(t.end(2), [Traffic::default(); 2]);
    }
}
