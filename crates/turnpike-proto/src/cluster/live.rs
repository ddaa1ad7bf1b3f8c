//! This server's own addresses, and which of them are the relayed addresses of live allocations.

use crate::ports::{PORT_WORDS, port_bit};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

/// One relay address and which of its ports are relayed addresses of live allocations.
#[derive(Debug)]
struct RelayPorts {
    bind: IpAddr,
    advertised: IpAddr,
    live: Box<[AtomicU64]>,
}

/// This server's own addresses, and the relayed transport addresses of live allocations, node-wide:
/// a bitmap of ports per relay address (8 KiB each), set when an allocation is created and cleared
/// when it is deleted, by the shard that owns it. It tells which of this server's own addresses a
/// client may reach through the relay (client -> TURN -> TURN -> client calls): only live relayed
/// addresses, never another program bound on the host. A lookup is a relaxed load, without a lock.
#[derive(Debug, Default)]
pub struct LiveRelays {
    addrs: Vec<RelayPorts>,
    /// Every address of this server: relay (bound and advertised) and listening ones.
    own: Vec<IpAddr>,
}

impl LiveRelays {
    /// The relay addresses, each as the address sockets bind and the one clients are told, and the
    /// other addresses the server listens on. Unspecified addresses are left out.
    pub fn new(
        relays: impl IntoIterator<Item = (IpAddr, IpAddr)>,
        listening: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        let mut addrs: Vec<RelayPorts> = Vec::new();
        let mut own = Vec::new();
        for (bind, advertised) in relays {
            if bind.is_unspecified() || addrs.iter().any(|a| a.bind == bind) {
                continue;
            }
            let live = (0..PORT_WORDS).map(|_| AtomicU64::new(0)).collect();
            addrs.push(RelayPorts { bind, advertised, live });
            own.extend([bind, advertised]);
        }
        own.extend(listening);
        own.retain(|ip| !ip.is_unspecified());
        own.sort_unstable();
        own.dedup();
        Self { addrs, own }
    }

    /// Whether `ip` (however spelled) is one of this server's own addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        self.own.contains(&crate::policy::peer::canonical(ip))
    }

    fn word(&self, bound: SocketAddr) -> Option<(&AtomicU64, u64)> {
        let entry = self.addrs.iter().find(|a| a.bind == bound.ip())?;
        let (word, bit) = port_bit(bound.port());
        Some((entry.live.get(word)?, bit))
    }

    /// A relay socket bound to `bound` now serves a live allocation.
    pub fn insert(&self, bound: SocketAddr) {
        if let Some((word, bit)) = self.word(bound) {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// The allocation the relay socket bound to `bound` served was deleted.
    pub fn remove(&self, bound: SocketAddr) {
        if let Some((word, bit)) = self.word(bound) {
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Whether `addr` (however spelled, by its bound or advertised address) is the relayed address of
    /// a live allocation of this server.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = crate::policy::peer::canonical(addr.ip());
        let (word, bit) = port_bit(addr.port());
        self.addrs.iter().any(|a| {
            (a.bind == ip || a.advertised == ip)
                && a.live.get(word).is_some_and(|w| w.load(Ordering::Relaxed) & bit != 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_relays_know_only_live_ports_however_spelled() {
        let bind: IpAddr = "127.0.0.1".parse().unwrap();
        let public: IpAddr = "203.0.113.9".parse().unwrap();
        let live = LiveRelays::new([(bind, public)], ["192.0.2.10".parse().unwrap()]);
        assert!(live.is_own(bind) && live.is_own(public) && live.is_own("::ffff:192.0.2.10".parse().unwrap()));
        assert!(!live.is_own("192.0.2.11".parse().unwrap()));
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let wildcard = LiveRelays::new([(any, any)], [any]);
        wildcard.insert(SocketAddr::new(any, 50_001));
        assert!(
            !wildcard.is_own(any) && !wildcard.contains(SocketAddr::new(any, 50_001)),
            "never the unspecified address"
        );
        let bound = SocketAddr::new(bind, 50_001);
        assert!(!live.contains(bound));
        live.insert(bound);
        assert!(live.contains(bound));
        assert!(live.contains("203.0.113.9:50001".parse().unwrap()), "by the advertised address");
        assert!(live.contains("[::ffff:127.0.0.1]:50001".parse().unwrap()), "IPv4-mapped");
        assert!(!live.contains("127.0.0.1:50002".parse().unwrap()), "another port");
        assert!(!live.contains("127.0.0.2:50001".parse().unwrap()), "another address");
        live.remove(bound);
        assert!(!live.contains(bound));
        // Unknown addresses are ignored.
        live.insert("10.0.0.1:1".parse().unwrap());
        assert!(!live.contains("10.0.0.1:1".parse().unwrap()));
    }
}
