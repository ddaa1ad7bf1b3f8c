//! turnpike behind real proxies, started here on loopback ports with generated certificates (their own
//! configuration files, in the foreground, killed by PID): nginx `stream` routing `turns:` by SNI to
//! turnpike's TLS listener with `proxy_protocol on` while a web name on the same port reaches a web
//! server; nginx terminating TLS and sending PROXY v1 to the TCP listener; HAProxy terminating TLS and
//! sending PROXY v2. A client from 127.0.0.7 must see 127.0.0.7 and its own port in
//! XOR-MAPPED-ADDRESS, allocate and relay.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods, missing_docs)]

mod common;

use common::stream::StreamClient;
use common::{EchoPeer, connect_from};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use turnpike::proto::attr::AttrType;
use turnpike::proto::{Method, StunMsg};

const CLIENT_IP: &str = "127.0.0.7";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A proxy process of ours, killed by PID on drop.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The proxies are installed (nginx with its stream module, haproxy), or the test is skipped.
fn proxies_or_skip() -> bool {
    let ok = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists()
        && Command::new("nginx").arg("-v").output().is_ok()
        && Command::new("haproxy").arg("-v").output().is_ok();
    if !ok {
        assert!(
            std::env::var_os("TURNPIKE_REQUIRE_PROXIES").is_none(),
            "nginx, its stream module and haproxy are required"
        );
        eprintln!("SKIPPED: nginx (libnginx-mod-stream) or haproxy not installed");
    }
    ok
}

/// A CA, and a certificate it signed for `names` (PEM files in `dir`); returns (ca der, cert, key).
fn certificates(dir: &Path) -> (Vec<u8>, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["turn.test".to_string(), "web.test".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(dir.join("both.pem"), format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
    (ca.der().to_vec(), c, k)
}

fn client_tls(ca: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(ca.to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS stream from 127.0.0.7 to `port` for the server name `name`.
fn tls_from_client_ip(port: u16, ca: &[u8], name: &str) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let tcp = connect_from(CLIENT_IP.parse().unwrap(), SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(client_tls(ca), server_name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Binding over `stream` (as the TURN client sees it): the XOR-MAPPED-ADDRESS, then an allocation
/// and a relayed round trip.
fn check_turn<S: Read + Write + turnpike_client::ReadTimeout>(
    stream: S,
    local: SocketAddr,
    peer: SocketAddr,
    user: &str,
) {
    let mut client = StreamClient::new(stream, user);
    let answer = client.request(Method::BINDING, &|_| {});
    let msg = StunMsg::parse(&answer).unwrap();
    let mapped =
        turnpike::proto::attr::decode_xor_addr(msg.attr(AttrType::XOR_MAPPED_ADDRESS).unwrap(), &msg.transaction_id())
            .unwrap();
    assert_eq!(mapped, local, "the server must see the real client");
    client.allocate();
    client.round_trips(peer);
}

/// turnpike on `ports` with TCP on `tcp_port` (0: any), TLS on `tls_port`, the certificate of `dir`,
/// trusting proxies on 127.0.0.1.
fn turnpike_behind_proxies(
    shards: usize,
    ports: (u16, u16),
    tcp_port: u16,
    tls_port: u16,
    cert: &Path,
    key: &Path,
) -> turnpike::server::ServerHandle {
    let yaml = common::test_yaml(
        shards,
        ports,
        "127.0.0.1",
        &format!("tls:\n  cert: {}\n  pkey: {}\n", cert.display(), key.display()),
    )
    .replace("  port: 0\n", &format!("  port: {tcp_port}\n  tls_port: {tls_port}\n  proxy_from: [127.0.0.1]\n"));
    let cfg = turnpike::config::parse(Path::new("<test>.yaml"), &yaml).unwrap();
    turnpike::server::start(&cfg).unwrap()
}

/// nginx on `conf` (written to `dir`), in the foreground, its files in `dir`.
fn start_nginx(dir: &Path, conf: &str) -> Proxy {
    let p = dir.display().to_string();
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    Proxy(
        Command::new("nginx")
            .args(["-p", &p, "-e", &format!("{p}/nginx.err"), "-c"])
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn nginx_and_haproxy_in_front_keep_the_real_client_address() {
    if !proxies_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("turnpike-edge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = certificates(&dir);

    // turnpike: TCP and TLS listeners, trusting the proxies on 127.0.0.1.
    let (tcp_port, tls_port) = (free_port(), free_port());
    let _server = turnpike_behind_proxies(2, (48400, 48439), tcp_port, tls_port, &cert, &key);
    let peer = EchoPeer::start();

    // nginx: port A routes by SNI (turn.test -> turnpike TLS with PROXY; else the web server on B);
    // port C terminates TLS and sends PROXY v1 to turnpike's TCP listener.
    let (a, b, c, h) = (free_port(), free_port(), free_port(), free_port());
    let p = dir.display();
    let nginx_conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off; master_process off; pid {p}/nginx.pid; error_log {p}/nginx.err warn;\n\
         events {{ worker_connections 256; }}\n\
         stream {{\n\
           map $ssl_preread_server_name $backend {{ turn.test turn; default web; }}\n\
           upstream turn {{ server 127.0.0.1:{tls_port}; }}\n\
           upstream web {{ server 127.0.0.1:{b}; }}\n\
           server {{ listen 127.0.0.1:{a}; ssl_preread on; proxy_pass $backend; proxy_protocol on; }}\n\
           server {{ listen 127.0.0.1:{c} ssl; ssl_certificate {cert}; ssl_certificate_key {key};\n\
                    proxy_pass 127.0.0.1:{tcp_port}; proxy_protocol on; }}\n\
         }}\n\
         http {{\n\
           access_log off; client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fcgi; uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;\n\
           server {{ listen 127.0.0.1:{b} ssl proxy_protocol; ssl_certificate {cert}; ssl_certificate_key {key};\n\
                    location / {{ return 200 \"web ok\\n\"; }} }}\n\
         }}\n",
        cert = cert.display(),
        key = key.display()
    );
    let nginx = start_nginx(&dir, &nginx_conf);
    // HAProxy on H: TLS terminated, PROXY v2 to turnpike's TCP listener.
    let haproxy_conf = format!(
        "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend turns\n  bind 127.0.0.1:{h} ssl crt {p}/both.pem\n  default_backend turnpike\n\
         backend turnpike\n  server t 127.0.0.1:{tcp_port} send-proxy-v2\n"
    );
    std::fs::write(dir.join("haproxy.cfg"), haproxy_conf).unwrap();
    let haproxy = Proxy(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(dir.join("haproxy.cfg"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for port in [a, b, c, h] {
        wait_listening(port);
    }

    // 1. SNI passthrough: turnpike terminates TLS, the real address arrives in the PROXY header.
    let s = tls_from_client_ip(a, &ca, "turn.test");
    let local = s.sock.local_addr().unwrap();
    check_turn(s, local, peer.addr, "via-sni");
    // ... and the web name on the same port reaches the web server.
    let mut web = tls_from_client_ip(a, &ca, "web.test");
    web.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n").unwrap();
    let mut page = String::new();
    let _ = web.read_to_string(&mut page);
    assert!(page.starts_with("HTTP/1.1 200") && page.contains("web ok"), "{page}");

    // 2. nginx terminating TLS, PROXY v1 to the TCP listener.
    let s = tls_from_client_ip(c, &ca, "turn.test");
    let local = s.sock.local_addr().unwrap();
    check_turn(s, local, peer.addr, "via-nginx-v1");

    // 3. HAProxy terminating TLS, PROXY v2 to the TCP listener.
    let s = tls_from_client_ip(h, &ca, "turn.test");
    let local = s.sock.local_addr().unwrap();
    check_turn(s, local, peer.addr, "via-haproxy-v2");
    drop((nginx, haproxy));
}

/// The page: two peer connections in one tab, relay-only ICE through `turns:` on nginx's shared port,
/// a data channel message from one to the other; the outcome is reported to `/result`.
fn webrtc_page(turn_port: u16, username: &str, password: &str) -> String {
    format!(
        r#"<!doctype html><script>
const report = (r) => fetch('/result?' + encodeURIComponent(r));
const cfg = {{ iceServers: [{{ urls: 'turns:turn.test:{turn_port}?transport=tcp', username: '{username}', credential: '{password}' }}],
              iceTransportPolicy: 'relay' }};
const a = new RTCPeerConnection(cfg), b = new RTCPeerConnection(cfg);
a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
b.ondatachannel = (e) => {{ e.channel.onmessage = (m) => report('ok:' + m.data); }};
const ch = a.createDataChannel('t');
ch.onopen = () => ch.send('hello through turns');
(async () => {{
  await a.setLocalDescription(await a.createOffer());
  await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription(await b.createAnswer());
  await a.setRemoteDescription(b.localDescription);
}})().catch((e) => report('error:' + e));
setTimeout(() => report('timeout:' + a.iceConnectionState), 25000);
</script>"#
    )
}

/// Serves `page` at `/` and returns what the page reports at `/result` (within 40 s).
fn serve_page(listener: TcpListener, page: String) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let body = if path.starts_with("/result?") { String::new() } else { page.clone() };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Some(result) = path.strip_prefix("/result?") {
                let _ = tx.send(result.replace("%3A", ":").replace("%20", " "));
            }
        }
    });
    rx
}

#[test]
fn a_browser_relays_over_turns_through_nginx_on_the_shared_port() {
    if !proxies_or_skip() {
        return;
    }
    let Some(chromium) =
        ["chromium", "chromium-browser"].into_iter().find(|c| Command::new(c).arg("--version").output().is_ok())
    else {
        assert!(std::env::var_os("TURNPIKE_REQUIRE_BROWSER").is_none(), "chromium is required");
        eprintln!("SKIPPED: chromium not installed");
        return;
    };
    let dir = std::env::temp_dir().join(format!("turnpike-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_, cert, key) = certificates(&dir);
    let tls_port = free_port();
    let server = turnpike_behind_proxies(1, (48440, 48479), 0, tls_port, &cert, &key);
    let a = free_port();
    let p = dir.display();
    let nginx_conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off; master_process off; pid {p}/nginx.pid; error_log {p}/nginx.err warn;\n\
         events {{ worker_connections 256; }}\n\
         stream {{\n\
           map $ssl_preread_server_name $backend {{ turn.test 127.0.0.1:{tls_port}; default 127.0.0.1:9; }}\n\
           server {{ listen 127.0.0.1:{a}; ssl_preread on; proxy_pass $backend; proxy_protocol on; }}\n\
         }}\n"
    );
    let _nginx = start_nginx(&dir, &nginx_conf);
    wait_listening(a);
    let username = format!("{}:browser", common::unix_now() + 3600);
    let password = turnpike::proto::integrity::rest_password(common::SECRET.as_bytes(), username.as_bytes());
    let page = webrtc_page(a, &username, &String::from_utf8_lossy(&password));
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", http.local_addr().unwrap());
    let results = serve_page(http, page);
    let profile = dir.join("profile");
    let _browser = Proxy(
        Command::new(chromium)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--ignore-certificate-errors",
                "--host-resolver-rules=MAP turn.test 127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let result = results.recv_timeout(Duration::from_secs(40)).expect("the page reports");
    assert_eq!(result, "ok:hello through turns", "the browser's data channel over relay-only ICE");
    // It went through turnpike: two allocations over TLS, data relayed.
    let totals = server.totals();
    assert!(totals.engine.allocations() >= 2 && totals.engine.packets.iter().sum::<u64>() > 0, "{totals:?}");
}
