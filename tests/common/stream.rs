//! The workspace's TURN client over TCP or TLS streams, and the TLS pieces the stream tests share.

use super::{REALM, SECRET, unix_now};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use turnpike::proto::{Class, Method, MsgWriter};
use turnpike_client::{Client, Credentials, Framed, Incoming, ReadTimeout, Session, channel_data};

/// The workspace's TURN client over a byte stream, with the test server's credentials.
pub struct StreamClient<S> {
    pub client: Client<Framed<S>>,
}

/// A frame from the server.
pub enum Frame {
    Stun(Vec<u8>),
    Channel(u16, Vec<u8>),
}

/// ChannelData of `payload` on `number`, padded to four bytes as streams need.
pub fn channel_frame(number: u16, payload: &[u8]) -> Vec<u8> {
    channel_data(number, payload, true).unwrap()
}

impl<S: Read + Write + ReadTimeout> StreamClient<S> {
    pub fn new(io: S, user: &str) -> Self {
        let credentials = Credentials::rest(SECRET.as_bytes(), user, unix_now() + 3600);
        let session = Session::new(credentials, 0x5354_0000).with_realm(REALM.as_bytes()).without_fingerprint();
        Self { client: Client::new(Framed::new(io), session, Duration::from_secs(5)) }
    }

    /// The stream.
    pub fn io(&mut self) -> &mut S {
        &mut self.client.transport.stream
    }

    pub fn build(&mut self, method: Method, class: Class, auth: bool, body: &dyn Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        self.client.session.message(method, class, auth, body)
    }

    pub fn read_frame(&mut self) -> Frame {
        let deadline = std::time::Instant::now() + self.client.timeout;
        let f = self.client.recv(deadline).expect("read").expect("a frame in time");
        match Incoming::parse(&f) {
            Some(Incoming::Channel { number, payload }) => {
                assert_eq!(f.len() % 4, 0, "ChannelData over streams is padded to 4");
                Frame::Channel(number, payload.to_vec())
            }
            _ => Frame::Stun(f),
        }
    }

    pub fn request(&mut self, method: Method, body: &dyn Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        self.client.request(method, body).unwrap_or_else(|e| panic!("{method:?}: {e}")).bytes().to_vec()
    }

    pub fn allocate(&mut self) -> SocketAddr {
        self.client.allocate(false).unwrap_or_else(|e| panic!("allocate failed: {e}"))
    }

    pub fn channel_bind(&mut self, number: u16, peer: SocketAddr) {
        let r = self.client.channel_bind(number, peer).unwrap_or_else(|e| panic!("ChannelBind: {e}"));
        assert_eq!(r.class(), Class::Success);
    }

    /// ChannelData and Send/Data indication round trips through an echo peer.
    pub fn round_trips(&mut self, peer: SocketAddr) {
        self.channel_bind(0x4000, peer);
        for payload in [&b"a"[..], b"odd length!", &[7u8; 1200]] {
            self.io().write_all(&channel_frame(0x4000, payload)).unwrap();
            match self.read_frame() {
                Frame::Channel(n, data) => assert_eq!((n, data.as_slice()), (0x4000, payload)),
                Frame::Stun(_) => panic!("expected ChannelData"),
            }
        }
        self.client.send_indication(peer, b"via indication").unwrap();
        // The peer is bound to a channel, so the echo comes back as ChannelData.
        match self.read_frame() {
            Frame::Channel(_, data) => assert_eq!(data, b"via indication"),
            Frame::Stun(_) => panic!("expected ChannelData"),
        }
    }
}

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A self-signed certificate for "localhost", written to a temporary directory.
pub fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    (c, k, cert.cert.der().to_vec())
}

pub fn tls_client(
    addr: SocketAddr,
    der: &[u8],
    version: &'static rustls::SupportedProtocolVersion,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der.to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    rustls::StreamOwned::new(conn, tcp(addr))
}
