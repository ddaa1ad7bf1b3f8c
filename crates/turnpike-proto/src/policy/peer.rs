//! Peer-address policy: which addresses the relay may send to.
//!
//! Decisions are made on the address a packet would actually reach. Every IPv6 address that spells an
//! IPv4 destination is judged as that IPv4 address ([`canonical`]): IPv4-mapped `::ffff:a.b.c.d`
//! (coturn CVE-2026-27624), IPv4-compatible `::a.b.c.d` (all of `::/96` but `::` and `::1`) and
//! IPv4-translated `::ffff:0:a.b.c.d` (RFC 2765). Addresses that carry an IPv4 address for a
//! translator or tunnel to reach ([`embedded_ipv4`]: NAT64, 6to4, Teredo, ISATAP) must be permitted
//! both as themselves and for what they embed. The unspecified addresses are refused
//! (CVE-2020-26262). By default every range of the IANA special-purpose registries that is not global
//! unicast is denied ([`DEFAULT_DENIED`]); `allowed` punches holes, `denied` adds more, and an explicit
//! deny of a narrower range wins over an allow of a wider one. [`ipv6_spellings`] lists the spellings,
//! and `tests/data/peer-addresses.txt` is the one table of addresses and verdicts the tests check
//! (`tests/security.rs`: against the policy itself and against a running server).

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
    pub(crate) fn cidr(base: IpAddr, prefix: u8) -> Option<Self> {
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

/// Ranges denied unless explicitly allowed: every entry of the IANA IPv4 and IPv6 Special-Purpose
/// Address Registries (RFC 6890 and successors) that is not globally reachable, plus multicast and the
/// deprecated site-local range. IPv6 spellings of IPv4 addresses are judged as IPv4 ([`canonical`]),
/// and the IPv4 addresses NAT64, 6to4, Teredo and ISATAP addresses embed are checked against the IPv4
/// entries ([`embedded_ipv4`]).
pub const DEFAULT_DENIED: &[&str] = &[
    // "This network" (RFC 791), private (RFC 1918), shared address space (RFC 6598), loopback,
    // link-local, IETF protocol assignments, documentation (TEST-NET-1/2/3), the deprecated 6to4
    // relay anycast (RFC 7526), benchmarking (RFC 2544), multicast and reserved (with broadcast).
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
    // Unspecified and loopback (the rest of ::/96 is IPv4-compatible, judged as IPv4).
    "::/128",
    "::1/128",
    // Discard-only (RFC 6666) and the dummy prefix (RFC 9780).
    "100::/64",
    "100:0:0:1::/64",
    // Benchmarking (RFC 5180), ORCHID (RFC 4843, deprecated) and ORCHIDv2 (RFC 7343): not routed.
    "2001:2::/48",
    "2001:10::/28",
    "2001:20::/28",
    // Documentation (RFC 3849, RFC 9637).
    "2001:db8::/32",
    "3fff::/20",
    // Segment Routing SIDs (RFC 9602): not globally reachable.
    "5f00::/16",
    // Local-use NAT64 (RFC 8215): what it embeds is site-specific, so it is refused outright.
    "64:ff9b:1::/48",
    // Unique local, link-local, site-local (deprecated, RFC 3879), multicast.
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

/// Maps the IPv6 addresses that are only spellings of an IPv4 destination to that IPv4 address:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d` (RFC 2765) and IPv4-compatible
/// `::a.b.c.d` (RFC 4291, deprecated but still routed as IPv4 by some stacks: all of `::/96` but `::`
/// and `::1`, so `::2` is `0.0.0.2`). Other addresses are returned as they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let seg = v6.segments();
    let embedded = match seg[..6] {
        [0, 0, 0, 0, 0, 0xffff] | [0, 0, 0, 0, 0xffff, 0] => true,
        [0, 0, 0, 0, 0, 0] => seg[6] != 0 || seg[7] > 1,
        _ => false,
    };
    if embedded { IpAddr::V4(last_32_bits(v6)) } else { ip }
}

fn last_32_bits(v6: Ipv6Addr) -> Ipv4Addr {
    let o = v6.octets();
    Ipv4Addr::new(o[12], o[13], o[14], o[15])
}

/// IPv4 destinations embedded in an IPv6 address by a translation or tunnelling scheme, which a
/// packet to that IPv6 address may end up reaching: NAT64 `64:ff9b::/96` (RFC 6052), 6to4 `2002::/16`
/// (RFC 3056), Teredo `2001::/32` (RFC 4380: the server address, and the client address stored
/// inverted) and ISATAP interface identifiers `::0:5efe:a.b.c.d` / `::200:5efe:a.b.c.d` under any
/// prefix, 6to4 and Teredo included (RFC 5214). Returns up to three addresses.
pub fn embedded_ipv4(v6: Ipv6Addr) -> [Option<Ipv4Addr>; 3] {
    let o = v6.octets();
    let seg = v6.segments();
    // ISATAP: the universal/local bit may be set (0x0200), the group bit is not.
    let isatap = (seg[4] & !0x0200 == 0 && seg[5] == 0x5efe).then(|| last_32_bits(v6));
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return [Some(last_32_bits(v6)), None, None];
    }
    if seg[0] == 0x2002 {
        return [Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])), isatap, None];
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]);
        return [Some(server), Some(client), isatap];
    }
    [isatap, None, None]
}

/// The key one source is counted under by per-source limits: an IPv4 address (however spelled), or an
/// IPv6 /64, which one host often holds whole.
pub fn source_key(ip: IpAddr) -> u128 {
    match canonical(ip) {
        IpAddr::V4(v4) => u128::from(v4.to_bits()),
        IpAddr::V6(v6) => (v6.to_bits() >> 64) | 1 << 127,
    }
}

/// Every IPv6 address [`PeerPolicy::permits`] judges as (or together with) the IPv4 address `v4`:
/// IPv4-mapped, IPv4-translated, IPv4-compatible, NAT64, 6to4, Teredo as server and as (inverted)
/// client behind a public server, and ISATAP with either universal/local bit. Each must be refused
/// wherever `v4` is.
pub fn ipv6_spellings(v4: Ipv4Addr) -> [Ipv6Addr; 9] {
    let o = v4.octets();
    let (hi, lo) = (u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]));
    let (inv_hi, inv_lo) = (!hi, !lo);
    [
        v4.to_ipv6_mapped(),
        Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, hi, lo),
        Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo),
        Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo),
        Ipv6Addr::new(0x2002, hi, lo, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0, hi, lo, 0, 0, 0xf7f7, 0xf7f7),
        Ipv6Addr::new(0x2001, 0, 0x0808, 0x0808, 0, 0, inv_hi, inv_lo),
        Ipv6Addr::new(0x2001, 0xdb9, 0, 1, 0, 0x5efe, hi, lo),
        Ipv6Addr::new(0x2001, 0xdb9, 0, 1, 0x200, 0x5efe, hi, lo),
    ]
}

impl PeerPolicy {
    /// A policy with the secure defaults, plus `allowed` and `denied` lists.
    pub fn new(allowed: Vec<IpRange>, denied: Vec<IpRange>, no_multicast: bool, relay_private: bool) -> Self {
        let defaults =
            if relay_private { Vec::new() } else { DEFAULT_DENIED.iter().filter_map(|s| s.parse().ok()).collect() };
        Self { defaults, allowed, denied, no_multicast }
    }

    /// Whether `ip` (however spelled) lies in a range of `allowed` that no narrower `denied` range
    /// takes back: the operator named it on purpose.
    pub(crate) fn explicitly_allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let narrowest = |list: &[IpRange]| list.iter().filter(|r| r.contains(ip)).map(IpRange::width).min();
        match (narrowest(&self.allowed), narrowest(&self.denied)) {
            (Some(a), Some(d)) => a < d,
            (Some(_), None) => true,
            _ => false,
        }
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
    fn canonical_maps_only_spellings_of_ipv4() {
        assert_eq!(canonical(ip("::ffff:0:127.0.0.2")), ip("127.0.0.2"));
        assert_eq!(canonical(ip("::2")), ip("0.0.0.2"));
        assert_eq!(canonical(ip("::1.0.0.0")), ip("1.0.0.0"));
        for keep in ["::", "::1", "::ffff:1:0:1", "::1:ffff:0:1", "2606:4700::1111"] {
            assert_eq!(canonical(ip(keep)), ip(keep), "{keep}");
        }
        for v4 in [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(8, 8, 8, 8)] {
            for s in &ipv6_spellings(v4)[..3] {
                assert_eq!(canonical(IpAddr::V6(*s)), IpAddr::V4(v4), "{s}");
            }
        }
    }

    #[test]
    fn isatap_identifiers_are_checked_under_6to4_and_teredo_prefixes_too() {
        let p = PeerPolicy::new(vec![], vec![], true, false);
        assert!(!p.permits(ip("2002:808:808:1:0:5efe:a00:1")), "6to4 of a public address, ISATAP of 10.0.0.1");
        assert!(!p.permits(ip("2001:0:808:808:0:5efe:7f00:1")), "Teredo server 8.8.8.8, ISATAP of 127.0.0.1");
        assert!(p.permits(ip("2002:808:808:1:0:5efe:808:404")));
    }

    #[test]
    fn explicit_allows_are_told_apart_from_defaults() {
        let p =
            PeerPolicy::new(vec!["203.0.113.0/24".parse().unwrap()], vec!["203.0.113.7".parse().unwrap()], true, false);
        assert!(p.explicitly_allows(ip("203.0.113.9")) && p.explicitly_allows(ip("::ffff:203.0.113.9")));
        assert!(!p.explicitly_allows(ip("203.0.113.7")), "a narrower deny takes it back");
        assert!(!p.explicitly_allows(ip("8.8.8.8")), "permitted by default, not named");
    }

    #[test]
    fn allow_punches_holes_and_narrower_deny_wins() {
        let p = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec!["127.0.0.53".parse().unwrap()], true, false);
        assert!(p.permits(ip("127.0.0.1")));
        assert!(p.permits(ip("::ffff:127.0.0.1")));
        assert!(p.permits(ip("::ffff:0:127.0.0.1")));
        assert!(!p.permits(ip("127.0.0.53")));
        assert!(!p.permits(ip("::ffff:0:127.0.0.53")));
        assert!(!p.permits(ip("0.0.0.0")));
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
            for s in ipv6_spellings(v4) {
                proptest::prop_assert!(!p.permits(IpAddr::V6(s)), "{} (spelling of {})", s, v4);
            }
        }

        /// Coturn-style denied ranges from the Synapse how-to hold for every spelling as well.
        #[test]
        fn configured_denies_hold_for_every_spelling(a in proptest::prelude::any::<u8>(), b in proptest::prelude::any::<u8>()) {
            let p = PeerPolicy::new(vec![], vec!["100.64.0.0-100.127.255.255".parse().unwrap()], true, true);
            let v4 = Ipv4Addr::new(100, 64 + (a % 64), b, 1);
            proptest::prop_assert!(!p.permits(IpAddr::V4(v4)));
            for s in ipv6_spellings(v4) {
                proptest::prop_assert!(!p.permits(IpAddr::V6(s)), "{}", s);
            }
        }

        /// No IPv6 address in `::/96` (IPv4-compatible) or `::ffff:0:0:0/96` (IPv4-translated) passes
        /// the defaults unless the IPv4 address it spells does.
        #[test]
        fn compatible_and_translated_forms_follow_their_ipv4(bits in proptest::prelude::any::<u32>(), translated in proptest::prelude::any::<bool>()) {
            let p = PeerPolicy::new(vec![], vec![], true, false);
            let v4 = Ipv4Addr::from(bits);
            let [hi, lo] = [(bits >> 16) as u16, bits as u16];
            let v6 = if translated { Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, hi, lo) } else { Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo) };
            if !p.permits(IpAddr::V4(v4)) {
                proptest::prop_assert!(!p.permits(IpAddr::V6(v6)), "{} spells {}", v6, v4);
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
