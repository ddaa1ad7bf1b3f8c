//! Loads relay.bpf.o (compiled by build.rs) with aya, attaches it with XDP to the interfaces that
//! carry relay traffic, and opens each shard's handles on its maps.
//!
//! Attachments are bpf_links (Linux 5.9+): the kernel detaches the program when the last descriptor
//! of the link closes, so it goes with the process on exit and on a crash alike. Nothing is pinned:
//! a program outliving its server would keep relaying channels nobody polices any more.

use super::maps::{ChannelKey, ChannelValue, PeerKey};
use super::table::ChannelMaps;
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode};
use std::io;
use std::os::fd::AsFd;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

/// The loaded program and its attachments; dropping it detaches and unloads.
pub(super) struct Loaded {
    ebpf: aya::Ebpf,
    /// Attached interfaces and their mode, for the log.
    pub(super) attached: Vec<(String, &'static str)>,
}

fn error(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Loaded {
    /// Loads the program and attaches it to every interface of `interfaces` (native XDP where the
    /// driver has it, else generic). Fails as a whole: nothing stays attached on an error.
    pub(super) fn attach(interfaces: &[String]) -> Result<Self, String> {
        let mut ebpf = aya::Ebpf::load(OBJECT).map_err(|e| error("loading the XDP program", permission_hint(&e)))?;
        let program: &mut Xdp = ebpf
            .program_mut("turnpike_relay")
            .ok_or("the XDP object has no turnpike_relay program")?
            .try_into()
            .map_err(|e| error("the XDP object", e))?;
        program.load().map_err(|e| error("verifying the XDP program", permission_hint(&e)))?;
        let mut attached = Vec::new();
        for name in interfaces {
            let mode = match program.attach(name, XdpMode::Driver) {
                Ok(_) => "native",
                Err(native) => match program.attach(name, XdpMode::Skb) {
                    Ok(_) => "generic",
                    Err(e) => {
                        return Err(format!("attaching XDP to {name}: {} (native: {})", permission_hint(&e), native));
                    }
                },
            };
            attached.push((name.clone(), mode));
        }
        Ok(Self { ebpf, attached })
    }

    /// A shard's own handles on the channel maps (duplicated descriptors: each shard writes without
    /// sharing a lock with the others; the kernel's hash map locks per bucket).
    /// `with_stats`: also a handle on the program's own counts (one shard reports them).
    pub(super) fn shard_maps(&self, with_stats: bool) -> Result<KernelMaps, String> {
        let open = |name: &str| -> Result<MapData, String> {
            let data = match self.ebpf.map(name) {
                Some(Map::HashMap(data) | Map::PerCpuArray(data)) => data,
                Some(_) => return Err(format!("{name} is not the map the program declares")),
                None => return Err(format!("the XDP object has no {name} map")),
            };
            let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| error(name, e))?;
            MapData::from_fd(fd).map_err(|e| error(name, e))
        };
        let channels = HashMap::try_from(Map::HashMap(open("channels")?)).map_err(|e| error("channels", e))?;
        let peers = HashMap::try_from(Map::HashMap(open("peers")?)).map_err(|e| error("peers", e))?;
        let stats = if with_stats {
            Some(PerCpuArray::try_from(Map::PerCpuArray(open("stats")?)).map_err(|e| error("stats", e))?)
        } else {
            None
        };
        Ok(KernelMaps { channels, peers, stats })
    }

    /// The program's own counts, summed over CPUs: [to peer, to client, no route].
    pub(super) fn stats(&self) -> [u64; 3] {
        match self.ebpf.map("stats").map(PerCpuArray::<&MapData, u64>::try_from) {
            Some(Ok(array)) => sum_stats(&array),
            _ => [0; 3],
        }
    }
}

/// The program's per-CPU counts summed: [to peer, to client, no route].
fn sum_stats<T: std::borrow::Borrow<MapData>>(array: &PerCpuArray<T, u64>) -> [u64; 3] {
    let mut out = [0u64; 3];
    for (i, slot) in out.iter_mut().enumerate() {
        if let Ok(values) = array.get(&(i as u32), 0) {
            *slot = values.iter().sum();
        }
    }
    out
}

/// Adds what the operator can do about a permission error.
fn permission_hint(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    if text.contains("Operation not permitted") || text.contains("EPERM") || text.contains("os error 1)") {
        format!("{text} (the kernel path needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or root)")
    } else {
        text
    }
}

/// A shard's handles on the `channels` and `peers` maps.
pub struct KernelMaps {
    channels: HashMap<MapData, ChannelKey, ChannelValue>,
    peers: HashMap<MapData, PeerKey, ChannelKey>,
    stats: Option<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for KernelMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelMaps")
    }
}

/// `BPF_NOEXIST`: an insert never overwrites another shard's entry.
const NO_EXIST: u64 = 1;

impl ChannelMaps for KernelMaps {
    fn insert(&mut self, key: &ChannelKey, value: &ChannelValue, peer: &PeerKey) -> io::Result<()> {
        self.channels.insert(key, value, NO_EXIST).map_err(io::Error::other)?;
        // The reverse entry last: a peer's datagram finds a channel only once the channel is whole.
        if let Err(e) = self.peers.insert(peer, key, NO_EXIST) {
            let _ = self.channels.remove(key);
            return Err(io::Error::other(e));
        }
        Ok(())
    }

    fn remove(&mut self, key: &ChannelKey, peer: &PeerKey) {
        let _ = self.peers.remove(peer);
        let _ = self.channels.remove(key);
    }

    fn read(&self, key: &ChannelKey) -> Option<ChannelValue> {
        self.channels.get(key, 0).ok()
    }

    fn program_stats(&self) -> Option<[u64; 3]> {
        self.stats.as_ref().map(sum_stats)
    }
}
