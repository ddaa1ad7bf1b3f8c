//! Peer-address policy: which addresses the relay may send to.
//!
//! Decisions are made on the address a packet would actually reach: IPv4-mapped and IPv4-compatible
//! IPv6 addresses are judged as the IPv4 address they embed (coturn CVE-2026-27624), and the unspecified
//! addresses are refused (CVE-2020-26262). By default every private, loopback, link-local, multicast
//! and reserved range is denied; `allowed` punches holes, `denied` adds more, and an explicit deny of a
//! narrower range wins over an allow of a wider one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    first: IpAddr,
    last: IpAddr,
}

fn v6_bits(ip: Ipv6Addr) -> u128 {
    u128::from_be_bytes(ip.octets())
}

impl IpRange {
    /// A range from `first` to `last` (same family, `first <= last`).
    pub fn new(first: IpAddr, last: IpAddr) -> Option<Self> {
        let ok = match (first, last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => a <= b,
            (IpAddr::V6(a), IpAddr::V6(b)) => a <= b,
            _ => false,
        };
        ok.then_some(Self { first, last })
    }

    /// A CIDR block.
    pub fn cidr(base: IpAddr, prefix: u8) -> Option<Self> {
        match base {
            IpAddr::V4(b) if prefix <= 32 => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - prefix)
                };
                let lo = u32::from(b) & mask;
                Some(Self {
                    first: IpAddr::V4(lo.into()),
                    last: IpAddr::V4((lo | !mask).into()),
                })
            }
            IpAddr::V6(b) if prefix <= 128 => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix)
                };
                let lo = v6_bits(b) & mask;
                Some(Self {
                    first: IpAddr::V6(lo.into()),
                    last: IpAddr::V6((lo | !mask).into()),
                })
            }
            _ => None,
        }
    }

    /// Whether `ip` (already canonical) lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (ip, self.first, self.last) {
            (IpAddr::V4(x), IpAddr::V4(a), IpAddr::V4(b)) => a <= x && x <= b,
            (IpAddr::V6(x), IpAddr::V6(a), IpAddr::V6(b)) => a <= x && x <= b,
            _ => false,
        }
    }

    /// Number of addresses minus one, as a width used to rank ranges (narrower wins).
    fn width(&self) -> u128 {
        match (self.first, self.last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => u128::from(u32::from(b) - u32::from(a)),
            (IpAddr::V6(a), IpAddr::V6(b)) => v6_bits(b) - v6_bits(a),
            _ => u128::MAX,
        }
    }
}

impl FromStr for IpRange {
    type Err = String;

    /// Accepts `a.b.c.d`, `a-b` (coturn's form) and `base/prefix`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let ip = |t: &str| {
            t.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("`{t}` is not an IP address"))
        };
        if let Some((a, b)) = s.split_once('-') {
            return Self::new(ip(a)?, ip(b)?)
                .ok_or_else(|| format!("`{s}`: range ends differ in family or are reversed"));
        }
        if let Some((a, p)) = s.split_once('/') {
            let prefix: u8 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{p}` is not a prefix length"))?;
            return Self::cidr(ip(a)?, prefix).ok_or_else(|| format!("`{s}`: prefix too long"));
        }
        let one = ip(s)?;
        Ok(Self {
            first: one,
            last: one,
        })
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Ranges denied unless explicitly allowed (IANA special-purpose registries, RFC 6890 and successors).
pub const DEFAULT_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "100::/64",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// The compiled peer policy.
#[derive(Clone, Debug, Default)]
pub struct PeerPolicy {
    defaults: Vec<IpRange>,
    allowed: Vec<IpRange>,
    denied: Vec<IpRange>,
    no_multicast: bool,
}

/// Maps IPv6 addresses that embed an IPv4 destination to that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let o = v6.octets();
            // IPv4-compatible ::a.b.c.d (deprecated, but routed as IPv4 by some stacks); :: and ::1 excluded.
            if o[..12].iter().all(|&b| b == 0) && (o[12] | o[13] | o[14]) != 0 {
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

impl PeerPolicy {
    /// A policy with the secure defaults, plus `allowed` and `denied` lists.
    pub fn new(
        allowed: Vec<IpRange>,
        denied: Vec<IpRange>,
        no_multicast: bool,
        relay_private: bool,
    ) -> Self {
        let defaults = if relay_private {
            Vec::new()
        } else {
            DEFAULT_DENIED
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect()
        };
        Self {
            defaults,
            allowed,
            denied,
            no_multicast,
        }
    }

    /// A policy that permits every unicast address (tests and fuzzing only).
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Whether the relay may send to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_unspecified() {
            return false;
        }
        if self.no_multicast && ip.is_multicast() {
            return false;
        }
        if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return false;
        }
        let narrowest = |list: &[IpRange]| {
            list.iter()
                .filter(|r| r.contains(ip))
                .map(IpRange::width)
                .min()
        };
        match (narrowest(&self.allowed), narrowest(&self.denied)) {
            (Some(a), Some(d)) => return a < d,
            (Some(_), None) => return true,
            (None, Some(_)) => return false,
            (None, None) => {}
        }
        !self.defaults.iter().any(|r| r.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_refuse_the_classic_targets() {
        let p = PeerPolicy::new(vec![], vec![], true, false);
        for s in [
            "0.0.0.0",
            "::",
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "169.254.169.254",
            "fe80::1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!p.permits(ip(s)), "{s} must be denied");
        }
        for s in ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(p.permits(ip(s)), "{s} must be allowed");
        }
    }

    #[test]
    fn allow_punches_holes_and_narrower_deny_wins() {
        let p = PeerPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            vec!["127.0.0.53".parse().unwrap()],
            true,
            false,
        );
        assert!(p.permits(ip("127.0.0.1")));
        assert!(p.permits(ip("::ffff:127.0.0.1")));
        assert!(!p.permits(ip("127.0.0.53")));
        assert!(!p.permits(ip("0.0.0.0")));
    }

    #[test]
    fn parses_coturn_ranges() {
        let r: IpRange = "10.0.0.0-10.255.255.255".parse().unwrap();
        assert!(r.contains(ip("10.9.9.9")) && !r.contains(ip("11.0.0.0")));
        assert!("10.0.0.0-9.0.0.0".parse::<IpRange>().is_err());
        assert!("1.2.3.4/33".parse::<IpRange>().is_err());
    }
}
