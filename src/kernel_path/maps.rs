//! The XDP program's map entries, laid out as in relay.bpf.c (`struct channel_key`, `channel_value`,
//! `peer_key`), and how a channel becomes them.

use std::net::{IpAddr, SocketAddr};

/// `struct channel_key`: which client datagrams a channel entry relays (client address and port, the
/// listening port, the channel number). Ports and the channel are in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    client_ip: [u8; 16],
    client_port: [u8; 2],
    server_port: [u8; 2],
    channel: [u8; 2],
    family: u8,
    pad: u8,
}

/// `struct channel_value`: where a channel's datagrams go, and the program's counts for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelValue {
    peer_ip: [u8; 16],
    relay_ip: [u8; 16],
    server_ip: [u8; 16],
    peer_port: [u8; 2],
    relay_port: [u8; 2],
    server_ip_known: u32,
    /// Datagrams the program sent to the peer.
    pub to_peer_packets: u64,
    /// Their payload bytes.
    pub to_peer_bytes: u64,
    /// Datagrams the program sent to the client.
    pub to_client_packets: u64,
    /// Their payload bytes.
    pub to_client_bytes: u64,
}

/// `struct peer_key`: which peer datagrams belong to a channel (peer address and port, the relayed
/// address and port they arrive at).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    peer_ip: [u8; 16],
    relay_ip: [u8; 16],
    peer_port: [u8; 2],
    relay_port: [u8; 2],
    family: u8,
    pad: [u8; 3],
}

/// An address as the program stores it: IPv4 in the first four bytes, the rest zero.
fn ip_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

/// One channel as map entries: `server`, the listening address the client sends to, is left for the
/// program to learn from the client's first datagram when it is a wildcard.
pub fn entries(
    client: SocketAddr,
    server: SocketAddr,
    channel: u16,
    peer: SocketAddr,
    relay: SocketAddr,
) -> (ChannelKey, ChannelValue, PeerKey) {
    let (client_ip, family) = ip_bytes(client.ip());
    let key = ChannelKey {
        client_ip,
        client_port: client.port().to_be_bytes(),
        server_port: server.port().to_be_bytes(),
        channel: channel.to_be_bytes(),
        family,
        pad: 0,
    };
    let (peer_ip, _) = ip_bytes(peer.ip());
    let (relay_ip, _) = ip_bytes(relay.ip());
    let known = !server.ip().is_unspecified();
    let value = ChannelValue {
        peer_ip,
        relay_ip,
        server_ip: if known { ip_bytes(server.ip()).0 } else { [0; 16] },
        peer_port: peer.port().to_be_bytes(),
        relay_port: relay.port().to_be_bytes(),
        server_ip_known: u32::from(known),
        ..ChannelValue::default()
    };
    let peer_key = PeerKey {
        peer_ip,
        relay_ip,
        peer_port: peer.port().to_be_bytes(),
        relay_port: relay.port().to_be_bytes(),
        family,
        pad: [0; 3],
    };
    (key, value, peer_key)
}

impl ChannelValue {
    /// Whether `other` sends the same datagrams the same way (counters and a learned server address
    /// aside).
    pub fn same_route(&self, other: &Self) -> bool {
        self.peer_ip == other.peer_ip
            && self.relay_ip == other.relay_ip
            && self.peer_port == other.peer_port
            && self.relay_port == other.relay_port
            && (self.server_ip_known == 0
                || (self.server_ip_known == other.server_ip_known && self.server_ip == other.server_ip))
    }
}

#[cfg(all(feature = "kernel-path", target_os = "linux"))]
mod pod {
    #![allow(unsafe_code)]
    use super::{ChannelKey, ChannelValue, PeerKey};

    // SAFETY: plain #[repr(C)] structs of integers and byte arrays without padding bytes (the
    // explicit `pad` fields fill them), so every bit pattern is a valid value, as aya::Pod requires.
    unsafe impl aya::Pod for ChannelKey {}
    // SAFETY: as above; 88 bytes, the u32 and u64 fields at offsets aligned for them.
    unsafe impl aya::Pod for ChannelValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layouts_are_the_programs() {
        assert_eq!(size_of::<ChannelKey>(), 24);
        assert_eq!(size_of::<ChannelValue>(), 88);
        assert_eq!(size_of::<PeerKey>(), 40);
        assert_eq!(std::mem::offset_of!(ChannelValue, server_ip_known), 52);
        assert_eq!(std::mem::offset_of!(ChannelValue, to_peer_packets), 56);
    }

    #[test]
    fn entries_put_ports_and_channel_in_network_order() {
        let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let peer: SocketAddr = "198.51.100.9:5004".parse().unwrap();
        let relay: SocketAddr = "203.0.113.1:50000".parse().unwrap();
        let (key, value, peer_key) = entries(client, "203.0.113.1:3478".parse().unwrap(), 0x4001, peer, relay);
        assert_eq!(&key.client_ip[..4], &[192, 0, 2, 7]);
        assert_eq!(key.client_ip[4..], [0; 12]);
        assert_eq!(key.client_port, [0x9c, 0x40]);
        assert_eq!(key.server_port, [0x0d, 0x96]);
        assert_eq!(key.channel, [0x40, 0x01]);
        assert_eq!(key.family, 4);
        assert_eq!(value.server_ip_known, 1);
        assert_eq!(peer_key.relay_port, 50000u16.to_be_bytes());
        let (_, wildcard, _) = entries(client, "0.0.0.0:3478".parse().unwrap(), 0x4001, peer, relay);
        assert_eq!(wildcard.server_ip_known, 0);
        assert!(wildcard.same_route(&value), "a learned server address is the same route");
        assert!(!value.same_route(&ChannelValue { peer_port: [0, 1], ..value }));
    }
}
