//! The kernel's ephemeral port range against the relay range.
//!
//! Linux picks the local port of every outgoing connection and of every socket bound to port 0 from
//! `net.ipv4.ip_local_port_range` (32768-60999 by default; IPv6 uses it too), which overlaps the usual
//! relay range 49152-65535. A relay port some other program holds cannot be bound: the Allocate skips
//! it, so the range is effectively smaller, and on a host with many outgoing connections noticeably so.
//! Ports listed in `net.ipv4.ip_local_reserved_ports` are never picked as ephemeral ports.

use std::ops::RangeInclusive;

/// Where the kernel's settings live.
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// How the relay range meets the ephemeral range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Overlap {
    /// The kernel's ephemeral range.
    pub ephemeral: RangeInclusive<u16>,
    /// Relay ports inside it.
    pub shared: RangeInclusive<u16>,
    /// Of those, how many are not reserved (the kernel may hand them out).
    pub exposed: u32,
}

/// Parses `ip_local_port_range` ("32768\t60999").
fn parse_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return None;
    };
    (lo <= hi).then_some(lo..=hi)
}

/// Parses `ip_local_reserved_ports` ("8080,49152-65535", or empty).
fn parse_reserved(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|item| {
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            let (lo, hi) = (lo.trim().parse::<u16>().ok()?, hi.trim().parse::<u16>().ok()?);
            (lo <= hi).then_some(lo..=hi)
        })
        .collect()
}

/// The overlap of `relay` with the ephemeral range described by the two files' contents, if any relay
/// port in it is not reserved.
pub(crate) fn overlap(relay: RangeInclusive<u16>, port_range: &str, reserved: &str) -> Option<Overlap> {
    let ephemeral = parse_range(port_range)?;
    let lo = *relay.start().max(ephemeral.start());
    let hi = *relay.end().min(ephemeral.end());
    if lo > hi {
        return None;
    }
    let reserved = parse_reserved(reserved);
    let exposed = (lo..=hi).filter(|p| !reserved.iter().any(|r| r.contains(p))).count() as u32;
    (exposed > 0).then_some(Overlap { ephemeral, shared: lo..=hi, exposed })
}

/// The overlap of `relay` with this host's ephemeral range now, if any (the kernel's settings read
/// from /proc; nothing when they cannot be read).
pub(crate) fn overlap_now(relay: RangeInclusive<u16>) -> Option<Overlap> {
    let port_range = std::fs::read_to_string(PORT_RANGE).ok()?;
    let reserved = std::fs::read_to_string(RESERVED_PORTS).unwrap_or_default();
    overlap(relay, &port_range, &reserved)
}

/// What an overlap means and how to remove it.
pub(crate) fn describe(o: &Overlap) -> String {
    format!(
        "{} relay ports ({}-{}) lie in the kernel's ephemeral port range {}-{} \
         (net.ipv4.ip_local_port_range): this host's outgoing connections can take them, and \
         allocations skip ports in use; move the ephemeral range out of the relay range \
         (scripts/ops/sysctl.conf, installed by the .deb) or reserve the relay range \
         (net.ipv4.ip_local_reserved_ports)",
        o.exposed,
        o.shared.start(),
        o.shared.end(),
        o.ephemeral.start(),
        o.ephemeral.end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ranges_overlap() {
        let o = overlap(49152..=65535, "32768\t60999\n", "\n").unwrap();
        assert_eq!((o.ephemeral, o.shared, o.exposed), (32768..=60999, 49152..=60999, 11848));
    }

    #[test]
    fn moved_or_reserved_ranges_do_not() {
        assert_eq!(overlap(49152..=65535, "32768 49151", ""), None, "scripts/ops/sysctl.conf");
        assert_eq!(overlap(49152..=65535, "32768 60999", "49152-65535"), None);
        let o = overlap(49152..=65535, "32768 60999", "8080,49152-59999").unwrap();
        assert_eq!((o.shared, o.exposed), (49152..=60999, 1000));
    }

    #[test]
    fn unreadable_settings_say_nothing() {
        assert_eq!(overlap(49152..=65535, "", ""), None);
        assert_eq!(overlap(49152..=65535, "60999 32768", ""), None);
        assert_eq!(overlap(49152..=65535, "x y", "a-b,,"), None);
        assert_eq!(overlap(40000..=40010, "32768 60999", "junk,40000-40004").map(|o| o.exposed), Some(6));
    }
}
