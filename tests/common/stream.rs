//! A TURN client over TCP or TLS streams, and the TLS pieces the stream tests share.

use super::{REALM, SECRET, unix_now};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use turnpike::proto::attr::{self, AttrType};
use turnpike::proto::framing::frame_len;
use turnpike::proto::integrity::{LongTermKey, long_term_key, rest_password};
use turnpike::proto::{Class, Method, MsgWriter, StunMsg, TransactionId};

/// A TURN client over any byte stream.
pub struct StreamClient<S: Read + Write> {
    pub io: S,
    username: String,
    key: LongTermKey,
    nonce: Vec<u8>,
    tid: u8,
    pending: Vec<u8>,
}

pub enum Frame {
    Stun(Vec<u8>),
    Channel(u16, Vec<u8>),
}

impl<S: Read + Write> StreamClient<S> {
    pub fn new(io: S, user: &str) -> Self {
        let username = format!("{}:{user}", unix_now() + 3600);
        let password = rest_password(SECRET.as_bytes(), username.as_bytes());
        let key = long_term_key(username.as_bytes(), REALM.as_bytes(), &password);
        Self { io, username, key, nonce: Vec::new(), tid: 0, pending: Vec::new() }
    }

    pub fn build(&mut self, method: Method, class: Class, auth: bool, body: &dyn Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let mut buf = vec![0u8; 1024];
        let mut w = MsgWriter::new(&mut buf, method, class, TransactionId([self.tid; 12]));
        body(&mut w);
        if auth {
            w.add_long_term_credentials(self.username.as_bytes(), REALM.as_bytes(), &self.nonce, &self.key);
        }
        let n = w.finish().unwrap();
        buf.truncate(n);
        buf
    }

    pub fn read_frame(&mut self) -> Frame {
        loop {
            if let Some(n) = frame_len(&self.pending).expect("server sends valid frames") {
                let f: Vec<u8> = self.pending.drain(..n).collect();
                if f[0] & 0xC0 == 0x40 {
                    assert_eq!(n % 4, 0, "ChannelData over streams is padded to 4");
                    let len = usize::from(u16::from_be_bytes([f[2], f[3]]));
                    return Frame::Channel(u16::from_be_bytes([f[0], f[1]]), f[4..4 + len].to_vec());
                }
                return Frame::Stun(f);
            }
            let mut buf = [0u8; 4096];
            let n = self.io.read(&mut buf).expect("read");
            assert!(n > 0, "server closed the connection");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    pub fn transact(&mut self, req: &[u8]) -> Vec<u8> {
        self.io.write_all(req).unwrap();
        loop {
            if let Frame::Stun(f) = self.read_frame()
                && f[8..20] == req[8..20]
            {
                return f;
            }
        }
    }

    pub fn request(&mut self, method: Method, body: &dyn Fn(&mut MsgWriter<'_>)) -> Vec<u8> {
        for _ in 0..3 {
            let auth = !self.nonce.is_empty();
            let req = self.build(method, Class::Request, auth, body);
            let r = self.transact(&req);
            let m = StunMsg::parse(&r).unwrap();
            let code = m.attr(AttrType::ERROR_CODE).map(|v| attr::decode_error_code(v).unwrap().0);
            if matches!(code, Some(401 | 438)) && (code == Some(438) || !auth) {
                self.nonce = m.attr(AttrType::NONCE).unwrap().to_vec();
                continue;
            }
            return r;
        }
        panic!("authentication loop");
    }

    pub fn allocate(&mut self) -> SocketAddr {
        let r = self.request(Method::ALLOCATE, &|w| w.add_bytes(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0]));
        let m = StunMsg::parse(&r).unwrap();
        assert_eq!(m.class(), Class::Success);
        attr::decode_xor_addr(m.attr(AttrType::XOR_RELAYED_ADDRESS).unwrap(), &m.transaction_id()).unwrap()
    }

    pub fn channel_bind(&mut self, number: u16, peer: SocketAddr) {
        let r = self.request(Method::CHANNEL_BIND, &|w| {
            w.add_bytes(AttrType::CHANNEL_NUMBER, &[(number >> 8) as u8, number as u8, 0, 0]);
            w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer);
        });
        assert_eq!(StunMsg::parse(&r).unwrap().class(), Class::Success);
    }

    pub fn channel_frame(number: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = number.to_be_bytes().to_vec();
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        v.extend_from_slice(payload);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    /// ChannelData and Send/Data indication round trips through an echo peer.
    pub fn round_trips(&mut self, peer: SocketAddr) {
        self.channel_bind(0x4000, peer);
        for payload in [&b"a"[..], b"odd length!", &[7u8; 1200]] {
            self.io.write_all(&Self::channel_frame(0x4000, payload)).unwrap();
            match self.read_frame() {
                Frame::Channel(n, data) => assert_eq!((n, data.as_slice()), (0x4000, payload)),
                Frame::Stun(_) => panic!("expected ChannelData"),
            }
        }
        let ind = self.build(Method::SEND, Class::Indication, false, &|w| {
            w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, SocketAddr::new(peer.ip(), peer.port()));
            w.add_bytes(AttrType::DATA, b"via indication");
        });
        self.io.write_all(&ind).unwrap();
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
