//! IPv6 (RFC 8656 / RFC 6156) on ::1: IPv6 listeners and relays, dual allocation, 440 and 443; and
//! `external-ip`: the advertised relay address differs from the bound one and data still flows.

#![allow(clippy::disallowed_methods)] // tests may read the clock and sleep
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use common::{EchoPeer, REALM, SECRET, TurnClient};
use std::net::SocketAddr;
use std::path::Path;
use turnpike::proto::attr::{self, AttrType, FAMILY_IPV4, FAMILY_IPV6};
use turnpike::proto::{Class, Method};
use turnpike::server::{self, ServerHandle};

fn start(relay_ips: &str, ports: (u16, u16), extra: &str) -> ServerHandle {
    let yaml = format!(
        "listen:\n  ips: [127.0.0.1, \"::1\"]\n  port: 0\nrelay:\n  ips: [{relay_ips}]\n  min_port: {}\n  max_port: {}\n{extra}\
         auth:\n  realm: {REALM}\n  shared_secrets: [{SECRET}]\npeers:\n  allowed: [127.0.0.1, \"::1\"]\nruntime:\n  threads: 2\n",
        ports.0, ports.1
    );
    let cfg = turnpike::config::parse(Path::new("<test>.yaml"), &yaml).unwrap();
    server::start(&cfg).unwrap()
}

fn v6_listener(server: &ServerHandle) -> SocketAddr {
    *server.udp_addrs.iter().find(|a| a.is_ipv6()).unwrap()
}

fn allocate(c: &mut TurnClient, extra: &dyn Fn(&mut turnpike::proto::MsgWriter<'_>)) -> common::Response {
    c.request(Method::ALLOCATE, &|w| {
        w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        extra(w);
    })
}

fn relayed_addresses(r: &common::Response) -> Vec<SocketAddr> {
    let m = r.msg();
    m.attrs()
        .filter(|a| a.typ == AttrType::XOR_RELAYED_ADDRESS)
        .map(|a| attr::decode_xor_addr(a.value, &m.transaction_id()).unwrap())
        .collect()
}

#[test]
fn ipv6_client_and_ipv6_relay() {
    let server = start("127.0.0.1, \"::1\"", (46000, 46019), "");
    let peer6 = EchoPeer::start_on("[::1]:0");
    let mut c = TurnClient::rest(v6_listener(&server), "six");
    // RFC 8656 §7.2: without REQUESTED-ADDRESS-FAMILY the relayed address is IPv4, even for an IPv6 client.
    let r = allocate(&mut c, &|_| {});
    assert_eq!(r.class(), Class::Success);
    assert!(relayed_addresses(&r)[0].is_ipv4());
    assert_eq!(c.refresh(0).class(), Class::Success);
    let r = allocate(&mut c, &|w| w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]));
    assert_eq!(r.class(), Class::Success);
    let relayed = relayed_addresses(&r);
    assert_eq!(relayed.len(), 1);
    assert!(relayed[0].is_ipv6());
    assert_eq!(c.channel_bind(0x4000, peer6.addr).class(), Class::Success);
    c.send_channel(0x4000, b"over ipv6");
    let (_, _, data) = c.recv_data().expect("echo over the IPv6 relay");
    assert_eq!(data, b"over ipv6");
    // 443: an IPv4 peer on an IPv6-only allocation.
    assert_eq!(c.create_permission("127.0.0.1:9".parse().unwrap()).code(), Some(443));
    let r = c.request(Method::REFRESH, &|w| w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[FAMILY_IPV4, 0, 0, 0]));
    assert_eq!(r.code(), Some(443), "Refresh naming a family the allocation lacks");
}

#[test]
fn dual_allocation_relays_both_families() {
    let server = start("127.0.0.1, \"::1\"", (46100, 46119), "");
    let peer4 = EchoPeer::start();
    let peer6 = EchoPeer::start_on("[::1]:0");
    let mut c = TurnClient::rest(server.udp_addrs[0], "dual");
    let r = allocate(&mut c, &|w| w.add_bytes(AttrType::ADDITIONAL_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]));
    assert_eq!(r.class(), Class::Success);
    assert!(r.attr(AttrType::ADDRESS_ERROR_CODE).is_none());
    let relayed = relayed_addresses(&r);
    assert_eq!(relayed.len(), 2);
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
    for (peer, n) in [(peer4.addr, 0x4000u16), (peer6.addr, 0x4001)] {
        assert_eq!(c.create_permission(peer).class(), Class::Success);
        c.send_indication(peer, b"dual");
        let (_, from, data) = c.recv_data().unwrap_or_else(|| panic!("no echo from {peer}"));
        assert_eq!((from, data.as_slice()), (Some(peer), &b"dual"[..]));
        assert_eq!(c.channel_bind(n, peer).class(), Class::Success);
        c.send_channel(n, b"dual channel");
        let (channel, _, data) = c.recv_data().expect("echo on the channel");
        assert_eq!((channel, data.as_slice()), (Some(n), &b"dual channel"[..]));
    }
    // The peers saw the relayed address of their own family.
    let r = c.request(Method::REFRESH, &|w| w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(c.refresh(0).class(), Class::Success);
    // Both sockets left service: closed, or kept open as spares for later allocations.
    let still_bound = relayed.iter().filter(|a| std::net::UdpSocket::bind(a).is_err()).count();
    let totals = server.totals();
    assert_eq!(
        (totals.engine.allocations(), still_bound as u64),
        (0, totals.engine.spare_relay_sockets),
        "{relayed:?}"
    );
}

#[test]
fn ipv6_not_offered_is_440() {
    let server = start("127.0.0.1", (46200, 46219), "");
    let mut c = TurnClient::rest(server.udp_addrs[0], "v4only");
    let r = allocate(&mut c, &|w| w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]));
    assert_eq!(r.code(), Some(440));
    let r = allocate(&mut c, &|w| w.add_bytes(AttrType::ADDITIONAL_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]));
    assert_eq!(r.class(), Class::Success, "the IPv4 half is granted");
    let err = r.attr(AttrType::ADDRESS_ERROR_CODE).expect("ADDRESS-ERROR-CODE for IPv6");
    assert_eq!((err[0], u16::from(err[2]) * 100 + u16::from(err[3])), (FAMILY_IPV6, 440));
    assert_eq!(relayed_addresses(&r).len(), 1);
    let r = allocate(&mut TurnClient::rest(server.udp_addrs[0], "x"), &|w| {
        w.add_bytes(AttrType::ADDITIONAL_ADDRESS_FAMILY, &[FAMILY_IPV4, 0, 0, 0])
    });
    assert_eq!(r.code(), Some(400), "ADDITIONAL-ADDRESS-FAMILY IPv4 is a 400");
}

/// external-ip PUBLIC/PRIVATE: clients are told PUBLIC, sockets bind PRIVATE, and data flows.
#[test]
fn external_ip_advertises_public_and_binds_private() {
    let server = start("127.0.0.1", (46300, 46319), "  external_ips: [\"198.51.100.77/127.0.0.1\"]\n");
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    let mut c = TurnClient::rest(server.udp_addrs[0], "natted");
    let r = allocate(&mut c, &|_| {});
    let advertised = relayed_addresses(&r)[0];
    assert_eq!(advertised.ip().to_string(), "198.51.100.77");
    assert_eq!(c.channel_bind(0x4000, peer.local_addr().unwrap()).class(), Class::Success);
    c.send_channel(0x4000, b"behind nat");
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"behind nat");
    assert_eq!(from, SocketAddr::new("127.0.0.1".parse().unwrap(), advertised.port()), "bound privately, same port");
    peer.send_to(b"reply", from).unwrap();
    let (_, _, data) = c.recv_data().unwrap();
    assert_eq!(data, b"reply");
    // The own-address exception covers the public spelling of a live relayed address too
    // (TURN -> TURN through the NAT), and no other port.
    assert_eq!(c.create_permission(advertised).class(), Class::Success);
    let idle = SocketAddr::new(advertised.ip(), if advertised.port() == 46305 { 46306 } else { 46305 });
    assert_eq!(c.create_permission(idle).code(), Some(403));
}
