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
                let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
                let lo = u32::from(b) & mask;
                Some(Self { first: IpAddr::V4(lo.into()), last: IpAddr::V4((lo | !mask).into()) })
            }
            IpAddr::V6(b) if prefix <= 128 => {
                let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
                let lo = v6_bits(b) & mask;
                Some(Self { first: IpAddr::V6(lo.into()), last: IpAddr::V6((lo | !mask).into()) })
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
        let ip = |t: &str| t.trim().parse::<IpAddr>().map_err(|_| format!("`{t}` is not an IP address"));
        if let Some((a, b)) = s.split_once('-') {
            return Self::new(ip(a)?, ip(b)?)
                .ok_or_else(|| format!("`{s}`: range ends differ in family or are reversed"));
        }
        if let Some((a, p)) = s.split_once('/') {
            let prefix: u8 = p.trim().parse().map_err(|_| format!("`{p}` is not a prefix length"))?;
            return Self::cidr(ip(a)?, prefix).ok_or_else(|| format!("`{s}`: prefix too long"));
        }
        let one = ip(s)?;
        Ok(Self { first: one, last: one })
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
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
    // Local-use NAT64 (RFC 8215): what it embeds is site-specific, so it is refused outright.
    "64:ff9b:1::/48",
    // Benchmarking, ORCHID and ORCHIDv2 (RFC 6890, RFC 7343).
    "2001:2::/48",
    "2001:10::/28",
    "2001:20::/28",
];

/// The compiled peer policy.
#[derive(Clone, Debug, Default)]
pub struct PeerPolicy {
    defaults: Vec<IpRange>,
    allowed: Vec<IpRange>,
    denied: Vec<IpRange>,
    no_multicast: bool,
}

/// Maps IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) addresses, which are only
/// spellings of an IPv4 destination, to that IPv4 address.
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

/// IPv4 destinations embedded in an IPv6 address by a translation or tunnelling scheme, which a
/// packet to that IPv6 address may end up reaching: NAT64 `64:ff9b::/96` (RFC 6052), 6to4 `2002::/16`
/// (RFC 3056) and Teredo `2001::/32` (RFC 4380: the server address, and the client address stored
/// inverted). Returns up to two addresses.
pub fn embedded_ipv4(v6: Ipv6Addr) -> [Option<Ipv4Addr>; 2] {
    let o = v6.octets();
    let seg = v6.segments();
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return [Some(Ipv4Addr::new(o[12], o[13], o[14], o[15])), None];
    }
    if seg[0] == 0x2002 {
        return [Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])), None];
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]);
        return [Some(server), Some(client)];
    }
    [None, None]
}

impl PeerPolicy {
    /// A policy with the secure defaults, plus `allowed` and `denied` lists.
    pub fn new(allowed: Vec<IpRange>, denied: Vec<IpRange>, no_multicast: bool, relay_private: bool) -> Self {
        let defaults =
            if relay_private { Vec::new() } else { DEFAULT_DENIED.iter().filter_map(|s| s.parse().ok()).collect() };
        Self { defaults, allowed, denied, no_multicast }
    }

    /// A policy that permits every unicast address (tests and fuzzing only).
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Whether the relay may send to `ip`: the address itself and every IPv4 address it embeds must
    /// each be permitted.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if !self.permits_one(ip) {
            return false;
        }
        match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6).into_iter().flatten().all(|v4| self.permits_one(IpAddr::V4(v4))),
            IpAddr::V4(_) => true,
        }
    }

    fn permits_one(&self, ip: IpAddr) -> bool {
        if ip.is_unspecified() {
            return false;
        }
        if self.no_multicast && ip.is_multicast() {
            return false;
        }
        if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return false;
        }
        let narrowest = |list: &[IpRange]| list.iter().filter(|r| r.contains(ip)).map(IpRange::width).min();
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
        let p = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec!["127.0.0.53".parse().unwrap()], true, false);
        assert!(p.permits(ip("127.0.0.1")));
        assert!(p.permits(ip("::ffff:127.0.0.1")));
        assert!(!p.permits(ip("127.0.0.53")));
        assert!(!p.permits(ip("0.0.0.0")));
    }

    /// Every way an IPv6 address can spell an IPv4 destination.
    fn spellings(v4: Ipv4Addr) -> Vec<IpAddr> {
        let o = v4.octets();
        let inv = [!o[0], !o[1], !o[2], !o[3]];
        vec![
            IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(Ipv6Addr::new(
                0,
                0,
                0,
                0,
                0,
                0,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
            )),
            IpAddr::V6(Ipv6Addr::new(
                0x64,
                0xff9b,
                0,
                0,
                0,
                0,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
            )),
            IpAddr::V6(Ipv6Addr::new(
                0x2002,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
                0,
                0,
                0,
                0,
                1,
            )),
            // Teredo with the target as server, and as (inverted) client behind a public server.
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
                0,
                0,
                0xf7f7,
                0xf7f7,
            )),
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0,
                0x0808,
                0x0808,
                0,
                0,
                u16::from_be_bytes([inv[0], inv[1]]),
                u16::from_be_bytes([inv[2], inv[3]]),
            )),
        ]
    }

    #[test]
    fn embedded_spellings_of_loopback_and_metadata_are_denied() {
        let p = PeerPolicy::new(vec![], vec![], true, false);
        for v4 in [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(169, 254, 169, 254), Ipv4Addr::new(10, 0, 0, 1)] {
            for s in spellings(v4) {
                assert!(!p.permits(s), "{s} spells {v4} and must be denied");
            }
        }
        // The same spellings of a public address are fine (for the IPv4-compatible form too).
        for s in spellings(Ipv4Addr::new(8, 8, 4, 4)) {
            assert!(p.permits(s), "{s} spells 8.8.4.4");
        }
        assert!(!p.permits(ip("64:ff9b:1::8.8.8.8")), "local-use NAT64 is refused outright");
    }

    #[test]
    fn explicit_allow_covers_embedded_spellings_and_explicit_deny_wins() {
        let p = PeerPolicy::new(vec!["127.0.0.1".parse().unwrap()], vec!["2002::/16".parse().unwrap()], true, false);
        assert!(p.permits(ip("::ffff:127.0.0.1")));
        assert!(p.permits(ip("64:ff9b::127.0.0.1")));
        assert!(!p.permits(ip("2002:7f00:1::1")), "an explicit deny of the IPv6 range still applies");
        assert!(!p.permits(ip("2002:0808:0808::1")));
    }

    proptest::proptest! {
        /// Every embedded-IPv4 spelling of every address in every default-denied IPv4 range is denied.
        #[test]
        fn every_spelling_of_every_denied_ipv4_is_denied(range_idx in 0usize..DEFAULT_DENIED.len(), offset in proptest::prelude::any::<u32>()) {
            let range: IpRange = DEFAULT_DENIED[range_idx].parse().unwrap();
            let (IpAddr::V4(first), IpAddr::V4(last)) = (range.first, range.last) else { return Ok(()) };
            let span = u32::from(last) - u32::from(first);
            let v4 = Ipv4Addr::from(u32::from(first) + offset % span.saturating_add(1).max(1));
            let p = PeerPolicy::new(vec![], vec![], true, false);
            proptest::prop_assert!(!p.permits(IpAddr::V4(v4)), "{}", v4);
            for s in spellings(v4) {
                proptest::prop_assert!(!p.permits(s), "{} (spelling of {})", s, v4);
            }
        }

        /// Coturn-style denied ranges from the Synapse how-to hold for every spelling as well.
        #[test]
        fn configured_denies_hold_for_every_spelling(a in proptest::prelude::any::<u8>(), b in proptest::prelude::any::<u8>()) {
            let p = PeerPolicy::new(vec![], vec!["100.64.0.0-100.127.255.255".parse().unwrap()], true, true);
            let v4 = Ipv4Addr::new(100, 64 + (a % 64), b, 1);
            proptest::prop_assert!(!p.permits(IpAddr::V4(v4)));
            for s in spellings(v4) {
                proptest::prop_assert!(!p.permits(s), "{}", s);
            }
        }
    }

    #[test]
    fn parses_coturn_ranges() {
        let r: IpRange = "10.0.0.0-10.255.255.255".parse().unwrap();
        assert!(r.contains(ip("10.9.9.9")) && !r.contains(ip("11.0.0.0")));
        assert!("10.0.0.0-9.0.0.0".parse::<IpRange>().is_err());
        assert!("1.2.3.4/33".parse::<IpRange>().is_err());
    }
}
