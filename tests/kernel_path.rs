//! The kernel path (`runtime.kernel_path`, cargo feature `kernel-path`) in network namespaces: a
//! client namespace and a peer namespace, each joined to the relay's namespace by a veth pair, all
//! made and removed by the test. Checks that what the XDP program relays is byte for byte what user
//! space relays (IPv4 and IPv6, both directions), that a reload denying the peer and a deleted
//! allocation stop it at once, that its counts are the engine's, and that what it does not fully
//! recognise (truncated, padded, unknown channels) still goes to user space.
//!
//! Needs root (namespaces, BPF). Skips with the reason where the machine refuses either, unless
//! TURNPIKE_REQUIRE_KERNEL_PATH=1 (the test command sets it where the machine allows them).

#![allow(clippy::disallowed_methods)] // tests may read the clock and sleep
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

#[cfg(not(feature = "kernel-path"))]
#[test]
fn kernel_path_needs_the_feature() {
    eprintln!("skipped: built without the kernel-path feature (cargo test --features kernel-path)");
}

#[cfg(feature = "kernel-path")]
mod netns {
    use super::common::{REALM, SECRET, unix_now};
    use std::net::{IpAddr, SocketAddr, UdpSocket};
    use std::os::fd::AsFd;
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};
    use turnpike::proto::attr::{AttrType, FAMILY_IPV6};
    use turnpike::proto::{Class, Method};
    use turnpike::server::{self, ServerHandle};
    use turnpike_client::{Client, Credentials, Session, Udp};

    const TIMEOUT: Duration = Duration::from_secs(3);

    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    fn in_ns(ns: &str, cmd: &[&str]) -> Result<(), String> {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// Three namespaces: client (`c0`) <-> relay (`r0`, `r1`) <-> peer (`p0`), IPv4 10.N.1.0/24 and
    /// 10.N.2.0/24, IPv6 fd00:N:1::/64 and fd00:N:2::/64; removed on drop.
    struct Net {
        names: [String; 3],
        n: u8,
    }

    impl Net {
        fn up(n: u8) -> Result<Self, String> {
            let pid = std::process::id();
            let names = ["c", "r", "p"].map(|role| format!("tpk{role}{n}-{pid}"));
            let net = Self { names, n };
            let [c, r, p] = &net.names;
            for ns in &net.names {
                ip(&["netns", "add", ns])?;
            }
            ip(&["-n", c, "link", "add", "c0", "type", "veth", "peer", "name", "r0", "netns", r])?;
            ip(&["-n", p, "link", "add", "p0", "type", "veth", "peer", "name", "r1", "netns", r])?;
            let addr = |ns: &str, dev: &str, v4: String, v6: String| -> Result<(), String> {
                ip(&["-n", ns, "addr", "add", &v4, "dev", dev])?;
                ip(&["-n", ns, "addr", "add", &v6, "dev", dev, "nodad"])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])
            };
            addr(c, "c0", format!("10.{n}.1.2/24"), format!("fd00:{n}:1::2/64"))?;
            addr(r, "r0", format!("10.{n}.1.1/24"), format!("fd00:{n}:1::1/64"))?;
            addr(r, "r1", format!("10.{n}.2.1/24"), format!("fd00:{n}:2::1/64"))?;
            addr(p, "p0", format!("10.{n}.2.2/24"), format!("fd00:{n}:2::2/64"))?;
            for (ns, gw4, gw6) in [
                (c, format!("10.{n}.1.1"), format!("fd00:{n}:1::1")),
                (p, format!("10.{n}.2.1"), format!("fd00:{n}:2::1")),
            ] {
                ip(&["-n", ns, "route", "add", "default", "via", &gw4])?;
                ip(&["-n", ns, "-6", "route", "add", "default", "via", &gw6])?;
            }
            // The XDP program's route lookup (bpf_fib_lookup) answers only where forwarding is on.
            for key in ["net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"] {
                in_ns(r, &["sysctl", "-qw", key])?;
            }
            // A veth end receives frames sent by XDP_TX or a redirect only with XDP (or GRO) on it.
            // And veth offloads UDP checksums (a sender leaves only the pseudo-header's sum, which the
            // receiver never checks): the hosts here compute them in full, as a NIC does on the wire,
            // since the XDP program updates the checksum it finds.
            for (ns, dev) in [(c, "c0"), (p, "p0")] {
                in_ns(ns, &["ethtool", "-K", dev, "gro", "on", "tx", "off"])?;
            }
            Ok(net)
        }

        fn ns(&self, role: usize) -> &str {
            &self.names[role]
        }

        /// Runs `f` with this thread in namespace `role` (0 client, 1 relay, 2 peer): sockets it opens
        /// and threads it starts live there.
        fn enter<T>(&self, role: usize, f: impl FnOnce() -> T) -> T {
            let here = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
            let there = std::fs::File::open(format!("/run/netns/{}", self.ns(role))).unwrap();
            nix::sched::setns(there.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let out = f();
            nix::sched::setns(here.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            out
        }

        fn client_ip(&self, v6: bool) -> IpAddr {
            self.addr(v6, 1, 2)
        }
        fn listen_ip(&self, v6: bool) -> IpAddr {
            self.addr(v6, 1, 1)
        }
        fn relay_ip(&self, v6: bool) -> IpAddr {
            self.addr(v6, 2, 1)
        }
        fn peer_ip(&self, v6: bool) -> IpAddr {
            self.addr(v6, 2, 2)
        }
        fn addr(&self, v6: bool, net: u8, host: u8) -> IpAddr {
            let n = self.n;
            if v6 {
                format!("fd00:{n}:{net}::{host}").parse().unwrap()
            } else {
                format!("10.{n}.{net}.{host}").parse().unwrap()
            }
        }

        fn yaml(&self, kernel_path: &str, allow_peers: bool) -> String {
            let n = self.n;
            let allowed = if allow_peers { format!("[\"10.{n}.2.0/24\", \"fd00:{n}:2::/64\"]") } else { "[]".into() };
            format!(
                "listen:\n  ips: [\"10.{n}.1.1\", \"fd00:{n}:1::1\"]\n  port: 3478\nrelay:\n  ips: [\"10.{n}.2.1\", \"fd00:{n}:2::1\"]\n  \
                 min_port: 50000\n  max_port: 50099\nauth:\n  realm: {REALM}\n  shared_secrets: [{SECRET}]\n\
                 peers:\n  allowed: {allowed}\nruntime:\n  threads: 1\n  kernel_path: {kernel_path}\n"
            )
        }

        fn start(&self, kernel_path: &str) -> Result<ServerHandle, String> {
            let cfg = turnpike::config::parse(Path::new("<test>.yaml"), &self.yaml(kernel_path, true)).unwrap();
            self.enter(1, || server::start(&cfg)).map_err(|e| e.to_string())
        }
    }

    impl Drop for Net {
        fn drop(&mut self) {
            for ns in &self.names {
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }

    /// The namespaces, or why this machine cannot have them or the kernel path (then the test
    /// skips, unless TURNPIKE_REQUIRE_KERNEL_PATH=1 makes that a failure).
    fn net_or_skip(n: u8) -> Option<(Net, ServerHandle)> {
        let required = std::env::var_os("TURNPIKE_REQUIRE_KERNEL_PATH").is_some_and(|v| v == "1");
        let attempt = Net::up(n).and_then(|net| {
            let server = net.start("on")?;
            Ok((net, server))
        });
        match attempt {
            Ok(pair) => Some(pair),
            Err(reason) if required => panic!("TURNPIKE_REQUIRE_KERNEL_PATH=1 but: {reason}"),
            Err(reason) => {
                eprintln!("skipped: the machine refuses network namespaces or XDP: {reason}");
                None
            }
        }
    }

    /// A TURN client in the client namespace with an allocation (of `v6` family at both ends) and
    /// channel 0x4001 bound to `peer`.
    struct Call {
        client: Client<Udp>,
        relayed: SocketAddr,
    }

    impl Call {
        fn open(net: &Net, v6: bool, peer: SocketAddr) -> Self {
            let server = SocketAddr::new(net.listen_ip(v6), 3478);
            let udp = net.enter(0, || Udp::bind(SocketAddr::new(net.client_ip(v6), 0), server).unwrap());
            let credentials = Credentials::rest(SECRET.as_bytes(), "kernel", unix_now() + 3600);
            let session = Session::new(credentials, std::process::id()).with_realm(REALM.as_bytes());
            let mut client = Client::new(udp, session, TIMEOUT);
            let answer = client
                .request(Method::ALLOCATE, |w: &mut turnpike::proto::MsgWriter<'_>| {
                    w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
                    if v6 {
                        w.add_bytes(AttrType::REQUESTED_ADDRESS_FAMILY, &[FAMILY_IPV6, 0, 0, 0]);
                    }
                })
                .unwrap();
            assert_eq!(answer.class(), Class::Success, "Allocate");
            let msg = answer.msg();
            let value = msg.attr(AttrType::XOR_RELAYED_ADDRESS).unwrap();
            let relayed = turnpike::proto::attr::decode_xor_addr(value, &msg.transaction_id()).unwrap();
            assert_eq!(client.channel_bind(0x4001, peer).unwrap().class(), Class::Success);
            Self { client, relayed }
        }

        fn sock(&self) -> &UdpSocket {
            &self.client.transport.socket
        }

        fn send_raw(&self, bytes: &[u8]) {
            self.sock().send_to(bytes, self.client.transport.server).unwrap();
        }

        fn send_channel(&self, payload: &[u8]) {
            let mut frame = vec![0x40, 0x01];
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            frame.extend_from_slice(payload);
            self.send_raw(&frame);
        }
    }

    /// One datagram each way before anything is counted: the first ones find no neighbour entry yet
    /// (the program's route lookup fails and leaves them to user space, whose sending makes one).
    fn warm_up(call: &Call, peer: &UdpSocket) {
        call.send_channel(b"warm-up");
        assert_eq!(receive(peer, 1, TIMEOUT).len(), 1, "the warm-up reached the peer");
        peer.send_to(b"warm-up", call.relayed).unwrap();
        assert_eq!(receive(call.sock(), 1, TIMEOUT).len(), 1, "the warm-up reached the client");
    }

    /// Receives datagrams for up to `wait` (or until `want` came): (bytes, source).
    fn receive(sock: &UdpSocket, want: usize, wait: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left)).unwrap();
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => got.push((buf[..n].to_vec(), from)),
                Err(_) => break,
            }
        }
        got
    }

    /// The payloads of the byte-identity check: sizes with every remainder mod 4, odd and even,
    /// and contents that differ per datagram.
    fn payloads() -> Vec<Vec<u8>> {
        [1usize, 2, 3, 4, 5, 100, 171, 172, 1000, 1199]
            .iter()
            .enumerate()
            .map(|(i, &len)| (0..len).map(|j| (j * 7 + i * 31) as u8).collect())
            .collect()
    }

    /// What one server configuration delivered: at the peer (payload, source is the relayed address),
    /// at the client (the whole datagram, source is the listener).
    struct Delivered {
        at_peer: Vec<Vec<u8>>,
        at_client: Vec<Vec<u8>>,
        /// What the program counted meanwhile (`stats`), [to peer, to client].
        through_xdp: [u64; 2],
    }

    fn exchange(net: &Net, v6: bool, stats: &dyn Fn() -> [u64; 3]) -> Delivered {
        let peer = net.enter(2, || UdpSocket::bind(SocketAddr::new(net.peer_ip(v6), 0)).unwrap());
        let call = Call::open(net, v6, peer.local_addr().unwrap());
        assert_eq!(call.relayed.ip(), net.relay_ip(v6));
        warm_up(&call, &peer);
        let before = stats();
        let listener = SocketAddr::new(net.listen_ip(v6), 3478);
        let mut at_peer = Vec::new();
        for p in payloads() {
            call.send_channel(&p);
            let got = receive(&peer, 1, TIMEOUT);
            assert_eq!(got.len(), 1, "a {}-byte ChannelData reached the peer", p.len());
            assert_eq!(got[0].1, call.relayed, "from the relayed address");
            at_peer.push(got[0].0.clone());
        }
        let mut at_client = Vec::new();
        for p in payloads() {
            peer.send_to(&p, call.relayed).unwrap();
            let got = receive(call.sock(), 1, TIMEOUT);
            assert_eq!(got.len(), 1, "a {}-byte datagram from the peer reached the client", p.len());
            assert_eq!(got[0].1, listener, "from the listening address");
            at_client.push(got[0].0.clone());
        }
        let after = stats();
        Delivered { at_peer, at_client, through_xdp: [after[0] - before[0], after[1] - before[1]] }
    }

    fn kernel_stats(server: &ServerHandle) -> [u64; 3] {
        server.kernel_path_stats().expect("the kernel path runs")
    }

    fn relayed_by_engine(server: &ServerHandle) -> [u64; 2] {
        server.totals().engine.packets
    }

    fn byte_identical(n: u8, v6: bool) {
        let Some((net, server)) = net_or_skip(n) else { return };
        let kernel = exchange(&net, v6, &|| kernel_stats(&server));
        let count = payloads().len() as u64;
        assert_eq!(kernel.through_xdp, [count, count], "every datagram after the warm-up went through XDP");
        // The engine's counts include the program's once a shard collected them (once a second).
        let deadline = Instant::now() + Duration::from_secs(5);
        // The warm-ups count too, whichever path took them.
        let all = [count + 1, count + 1];
        while relayed_by_engine(&server) != all && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(relayed_by_engine(&server), all, "the program's counts reach the engine's");
        let io = server.totals().io;
        assert_eq!(
            io.kernel_datagrams[0] + io.kernel_datagrams[1],
            kernel_stats(&server)[0] + kernel_stats(&server)[1]
        );
        assert_eq!(io.kernel_channels, 1);
        // Datagrams left to user space for want of a route (the first towards a new neighbour, when
        // the kernel does not know its link-layer address yet) are reported as the program counts them.
        assert_eq!(io.kernel_no_route, kernel_stats(&server)[2], "reported in turnpike_kernel_path_no_route_total");
        server.shutdown();
        let user = net.start("off").unwrap();
        assert!(user.kernel_path_stats().is_none(), "kernel_path: off loads nothing");
        let user_space = exchange(&net, v6, &|| [0; 3]);
        assert_eq!(kernel.at_peer, user_space.at_peer, "peers get the same bytes");
        assert_eq!(kernel.at_client, user_space.at_client, "clients get the same bytes");
        for (sent, got) in payloads().iter().zip(&kernel.at_client) {
            assert_eq!(&got[..2], &[0x40, 0x01]);
            assert_eq!(&got[2..4], &(sent.len() as u16).to_be_bytes());
            assert_eq!(&got[4..], &sent[..], "ChannelData without padding over UDP");
        }
        user.shutdown();
    }

    #[test]
    fn ipv4_relaying_is_byte_identical_to_user_space() {
        byte_identical(211, false);
    }

    #[test]
    fn ipv6_relaying_is_byte_identical_to_user_space() {
        byte_identical(212, true);
    }

    /// Sends one datagram each way and says which arrived: (at peer, at client).
    fn both_ways(call: &Call, peer: &UdpSocket) -> (bool, bool) {
        call.send_channel(b"to the peer");
        let to_peer = !receive(peer, 1, Duration::from_millis(400)).is_empty();
        peer.send_to(b"to the client", call.relayed).unwrap();
        let to_client = !receive(call.sock(), 1, Duration::from_millis(400)).is_empty();
        (to_peer, to_client)
    }

    #[test]
    fn a_reload_that_denies_the_peer_and_a_deleted_allocation_stop_it_at_once() {
        let Some((net, server)) = net_or_skip(213) else { return };
        let peer = net.enter(2, || UdpSocket::bind(SocketAddr::new(net.peer_ip(false), 0)).unwrap());
        let mut call = Call::open(&net, false, peer.local_addr().unwrap());
        warm_up(&call, &peer);
        let before = kernel_stats(&server);
        assert_eq!(both_ways(&call, &peer), (true, true));
        assert_eq!(kernel_stats(&server)[0] - before[0], 1, "relayed by XDP");
        // Reload with the peer range no longer allowed: nothing more either way, in the kernel or not.
        let dir = std::env::temp_dir().join(format!("turnpike-kernel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("deny.yaml");
        std::fs::write(&file, net.yaml("on", false)).unwrap();
        server.reload_from(&file).unwrap();
        let stats = kernel_stats(&server);
        assert_eq!(both_ways(&call, &peer), (false, false), "a denied peer is cut off");
        assert_eq!(kernel_stats(&server)[..2], stats[..2], "nothing went through XDP after the reload");
        // Allowed again: a new ChannelBind installs it again.
        std::fs::write(&file, net.yaml("on", true)).unwrap();
        server.reload_from(&file).unwrap();
        assert_eq!(call.client.channel_bind(0x4001, peer.local_addr().unwrap()).unwrap().class(), Class::Success);
        assert_eq!(both_ways(&call, &peer), (true, true));
        // Deleted: its entries go with it.
        assert_eq!(call.client.refresh(0).unwrap().class(), Class::Success);
        let stats = kernel_stats(&server);
        assert_eq!(both_ways(&call, &peer), (false, false), "a deleted allocation relays nothing");
        assert_eq!(kernel_stats(&server)[..2], stats[..2]);
        std::fs::remove_dir_all(&dir).ok();
        server.shutdown();
    }

    #[test]
    fn what_the_program_does_not_recognise_goes_to_user_space() {
        let Some((net, server)) = net_or_skip(214) else { return };
        let peer = net.enter(2, || UdpSocket::bind(SocketAddr::new(net.peer_ip(false), 0)).unwrap());
        let call = Call::open(&net, false, peer.local_addr().unwrap());
        warm_up(&call, &peer);
        let malformed_before = server.totals().engine.drops[turnpike::proto::DropReason::Malformed.index()];
        let before = kernel_stats(&server);
        // Truncated: the length says 100, 10 bytes follow. User space drops it as malformed.
        let mut truncated = vec![0x40, 0x01, 0, 100];
        truncated.extend_from_slice(&[7; 10]);
        call.send_raw(&truncated);
        // Padded to four bytes (allowed, needed only over streams): user space relays the 5 bytes.
        call.send_raw(&[0x40, 0x01, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
        // An unbound channel: user space drops it.
        call.send_raw(&[0x40, 0x02, 0, 3, 1, 2, 3]);
        let got = receive(&peer, 2, Duration::from_secs(1));
        assert_eq!(
            got.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>(),
            vec![vec![1, 2, 3, 4, 5]],
            "only the padded one is relayed"
        );
        assert_eq!(kernel_stats(&server)[0], before[0], "none of them went through XDP");
        let malformed = server.totals().engine.drops[turnpike::proto::DropReason::Malformed.index()];
        assert_eq!(malformed - malformed_before, 1, "the truncated one was dropped by user space as malformed");
        // A well-formed one still goes through XDP.
        call.send_channel(b"fine");
        assert_eq!(receive(&peer, 1, TIMEOUT).len(), 1);
        assert_eq!(kernel_stats(&server)[0], before[0] + 1);
        server.shutdown();
    }

    #[test]
    fn without_forwarding_auto_relays_in_user_space_and_on_refuses() {
        let Some((net, server)) = net_or_skip(215) else { return };
        server.shutdown();
        in_ns(net.ns(1), &["sysctl", "-qw", "net.ipv4.conf.r1.forwarding=0"]).unwrap();
        let refused = net.start("on").expect_err("kernel_path: on must refuse to start without forwarding");
        assert!(refused.contains("net.ipv4.conf.r1.forwarding"), "{refused}");
        let server = net.start("auto").unwrap();
        assert!(server.kernel_path_stats().is_none(), "auto fell back to user space");
        let peer = net.enter(2, || UdpSocket::bind(SocketAddr::new(net.peer_ip(false), 0)).unwrap());
        let call = Call::open(&net, false, peer.local_addr().unwrap());
        warm_up(&call, &peer);
        assert_eq!(both_ways(&call, &peer), (true, true), "user space relays");
        server.shutdown();
    }

    /// The XDP programs on the relay namespace's interfaces (`ip -d link` names them "prog/xdp").
    fn attached(net: &Net) -> usize {
        let out = Command::new("ip").args(["-n", net.ns(1), "-d", "link", "show"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).matches("prog/xdp").count()
    }

    #[test]
    fn a_killed_server_leaves_no_program_attached() {
        let Some((net, server)) = net_or_skip(216) else { return };
        assert_eq!(attached(&net), 2, "both relay interfaces carry the program while it runs");
        server.shutdown();
        assert_eq!(attached(&net), 0, "a stopped server detaches");
        // The binary in the relay namespace, killed with SIGKILL: the bpf_links close with the process.
        let dir = std::env::temp_dir().join(format!("turnpike-kernel-kill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("turnpike.yaml");
        std::fs::write(&file, net.yaml("on", true)).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", net.ns(1), env!("CARGO_BIN_EXE_turnpike"), "run", "--config"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while !seen.iter().any(|l: &String| l.contains("relayed by XDP on")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("the binary did not attach the kernel path: {seen:#?}"),
            }
        }
        assert_eq!(attached(&net), 2);
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while attached(&net) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(attached(&net), 0, "nothing stays attached after a SIGKILL");
        std::fs::remove_dir_all(&dir).ok();
    }
}
