//! The kernel path (`runtime.kernel_path`): an XDP program (relay.bpf.c) relays the ChannelData of
//! UDP clients' channels in the kernel's receive path, in both directions, so that a call's media
//! never wakes a shard. User space stays the authority: each shard installs a channel only while the
//! engine allows it ([`table`]) and takes the program's counts back for its allocations.
//!
//! Off by default. `auto` uses it when this build has it (cargo feature `kernel-path`), the kernel
//! takes the program and every chosen interface takes the attachment, and otherwise says why in the
//! log and relays in user space; `on` refuses to start without it.

pub mod maps;
pub mod table;

#[cfg(all(feature = "kernel-path", target_os = "linux"))]
mod loader;

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// `runtime.kernel_path`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelPathMode {
    /// User space relays everything; no BPF object is loaded.
    #[default]
    Off,
    /// The kernel path where it can be had, user space otherwise (the log says why).
    Auto,
    /// The kernel path or no start.
    On,
}

/// A shard's handles on the program's maps.
#[cfg(all(feature = "kernel-path", target_os = "linux"))]
pub type ShardMaps = loader::KernelMaps;

/// A shard's handles on the program's maps (none exist in a build without the kernel path).
#[cfg(not(all(feature = "kernel-path", target_os = "linux")))]
#[derive(Debug)]
pub enum ShardMaps {}

#[cfg(not(all(feature = "kernel-path", target_os = "linux")))]
impl table::ChannelMaps for ShardMaps {
    fn insert(&mut self, _: &maps::ChannelKey, _: &maps::ChannelValue, _: &maps::PeerKey) -> std::io::Result<()> {
        match *self {}
    }
    fn remove(&mut self, _: &maps::ChannelKey, _: &maps::PeerKey) {
        match *self {}
    }
    fn read(&self, _: &maps::ChannelKey) -> Option<maps::ChannelValue> {
        match *self {}
    }
}

/// The loaded and attached program; dropping it detaches it.
pub struct KernelPath {
    #[cfg(all(feature = "kernel-path", target_os = "linux"))]
    loaded: loader::Loaded,
}

impl std::fmt::Debug for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelPath")
    }
}

/// Where the kernel path would run: the interfaces named in `runtime.kernel_interfaces`, else those
/// holding a listening or relay address (every interface that is up with an address of the family,
/// for a wildcard listener); loopback only when named.
pub fn choose_interfaces(named: &[String], ips: &[IpAddr]) -> Result<Vec<String>, String> {
    if !named.is_empty() {
        return Ok(named.to_vec());
    }
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?;
    let mut out: Vec<String> = Vec::new();
    for ifa in addrs {
        let Some(ip) = ifa.address.as_ref().and_then(|a| {
            a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())).or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        }) else {
            continue;
        };
        let up = ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
        let loopback = ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
        let wanted = ips.iter().any(|want| *want == ip || (want.is_unspecified() && want.is_ipv4() == ip.is_ipv4()));
        if up && !loopback && wanted && !out.contains(&ifa.interface_name) {
            out.push(ifa.interface_name);
        }
    }
    if out.is_empty() {
        return Err("no interface other than loopback holds a listening or relay address \
                    (name them in runtime.kernel_interfaces)"
            .into());
    }
    Ok(out)
}

/// Whether this kernel attaches XDP through bpf_link (5.9+), which detaches with the process.
fn kernel_has_xdp_links() -> Result<(), String> {
    let release = nix::sys::utsname::uname().map_err(|e| format!("uname: {e}"))?;
    let release = release.release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < (5, 9) {
        return Err(format!(
            "Linux {release} attaches XDP without bpf_link (5.9+), so a crash would leave it attached"
        ));
    }
    Ok(())
}

/// The kernel's route lookup from XDP (`bpf_fib_lookup`) answers only for interfaces that forward
/// (otherwise `BPF_FIB_LKUP_RET_FWD_DISABLED`): the program would find no route for any datagram and
/// hand each up to user space after a wasted lookup. Returns the sysctl keys that are off, for the
/// address families in use.
fn forwarding_off(interfaces: &[String], ips: &[IpAddr]) -> Vec<String> {
    let on = |key: &str| {
        std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/"))).is_ok_and(|v| v.trim() == "1")
    };
    let (v4, v6) = (ips.iter().any(IpAddr::is_ipv4), ips.iter().any(IpAddr::is_ipv6));
    let mut off = Vec::new();
    for name in interfaces {
        for (family, used) in [("ipv4", v4), ("ipv6", v6)] {
            let key = format!("net.{family}.conf.{name}.forwarding");
            if used && !on(&key) {
                off.push(key);
            }
        }
    }
    off
}

impl KernelPath {
    /// Loads and attaches the program for `mode` (`Off`: nothing). `Auto` logs why it could not and
    /// returns `Ok(None)`; `On` returns the reason as an error.
    pub fn start(mode: KernelPathMode, named: &[String], ips: &[IpAddr]) -> Result<Option<Self>, String> {
        if mode == KernelPathMode::Off {
            return Ok(None);
        }
        match Self::attach(named, ips) {
            Ok(path) => Ok(Some(path)),
            Err(reason) if mode == KernelPathMode::Auto => {
                log::warn!("runtime.kernel_path: auto: relaying in user space: {reason}");
                Ok(None)
            }
            Err(reason) => Err(format!("runtime.kernel_path: on: {reason}")),
        }
    }

    #[cfg(all(feature = "kernel-path", target_os = "linux"))]
    fn attach(named: &[String], ips: &[IpAddr]) -> Result<Self, String> {
        kernel_has_xdp_links()?;
        let interfaces = choose_interfaces(named, ips)?;
        let off = forwarding_off(&interfaces, ips);
        if !off.is_empty() {
            return Err(format!(
                "forwarding is off ({}): the kernel's route lookup from XDP answers only on interfaces that \
                 forward; set {} (with IPv6 also accept_ra=2 to keep router advertisements) and a FORWARD policy of \
                 drop in the firewall, which relayed datagrams do not pass through",
                off.join(", "),
                off.iter().map(|k| format!("{k}=1")).collect::<Vec<_>>().join(" ")
            ));
        }
        let loaded = loader::Loaded::attach(&interfaces)?;
        let attached: Vec<String> = loaded.attached.iter().map(|(name, mode)| format!("{name} ({mode})")).collect();
        log::info!("kernel path: ChannelData of UDP clients is relayed by XDP on {}", attached.join(", "));
        Ok(Self { loaded })
    }

    #[cfg(not(all(feature = "kernel-path", target_os = "linux")))]
    fn attach(_named: &[String], _ips: &[IpAddr]) -> Result<Self, String> {
        let _ = (kernel_has_xdp_links, forwarding_off);
        Err("this turnpike was built without the kernel path (cargo feature kernel-path)".into())
    }

    /// A shard's handles on the maps; `with_stats`: with the program's own counts too (for the one
    /// shard that reports them).
    pub fn shard_maps(&self, with_stats: bool) -> Result<ShardMaps, String> {
        #[cfg(all(feature = "kernel-path", target_os = "linux"))]
        return self.loaded.shard_maps(with_stats);
        #[cfg(not(all(feature = "kernel-path", target_os = "linux")))]
        {
            let _ = with_stats;
            Err("no kernel path in this build".into())
        }
    }

    /// The program's counts: datagrams it relayed to peers, to clients, and installed channels'
    /// datagrams it left to user space for want of a route.
    pub fn stats(&self) -> [u64; 3] {
        #[cfg(all(feature = "kernel-path", target_os = "linux"))]
        return self.loaded.stats();
        #[cfg(not(all(feature = "kernel-path", target_os = "linux")))]
        [0; 3]
    }
}
