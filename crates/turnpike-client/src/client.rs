//! A blocking TURN client: a [`Session`] over a [`Transport`], with deadlines and retransmission.

use crate::message::{Answer, Incoming, channel_data};
use crate::session::{Next, Session, allocate_attributes, channel_bind_attributes};
use crate::transport::{Transport, now};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use turnpike_proto::attr::AttrType;
use turnpike_proto::{Class, Method, MsgWriter};

/// How many times a request is sent over UDP before the client gives up.
const UDP_ATTEMPTS: u32 = 3;
/// How many answers may ask for credentials again (401, then 438s) before the client gives up.
const AUTH_ROUNDS: usize = 3;

/// Why a request got no usable answer.
#[derive(Debug)]
pub enum Failure {
    /// Nothing answered it before the timeout.
    NoAnswer,
    /// The transport failed.
    Io(io::Error),
    /// The server answered with an error response (or, for [`Client::allocate`], a success that
    /// lacks the relayed address).
    Refused(Answer),
}

impl Failure {
    /// The error code of a refusal.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Refused(answer) => answer.code(),
            Self::NoAnswer | Self::Io(_) => None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoAnswer => f.write_str("no answer"),
            Self::Io(e) => write!(f, "I/O error: {e}"),
            Self::Refused(answer) => match answer.code() {
                Some(code) => write!(f, "error {code}"),
                None => f.write_str("an answer without what was asked for"),
            },
        }
    }
}

impl std::error::Error for Failure {}

/// Relayed data as received: on a channel, or in a Data indication from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// The channel it came on (ChannelData), `None` for a Data indication.
    pub channel: Option<u16>,
    /// The peer of a Data indication.
    pub peer: Option<SocketAddr>,
    /// The application data.
    pub payload: Vec<u8>,
}

/// A TURN client that waits for its answers.
#[derive(Debug)]
pub struct Client<T> {
    /// The way to the server.
    pub transport: T,
    /// Credentials, nonce and transaction IDs.
    pub session: Session,
    /// How long a request may wait for its answer, retransmissions included.
    pub timeout: Duration,
}

impl<T: Transport> Client<T> {
    /// A client of `session` over `transport`.
    pub fn new(transport: T, session: Session, timeout: Duration) -> Self {
        Self { transport, session, timeout }
    }

    /// Sends `request` and waits for the response carrying its transaction ID, skipping anything
    /// else received meanwhile. Over UDP the request is sent up to three times, each wait longer.
    pub fn transact(&mut self, request: &[u8]) -> Result<Answer, Failure> {
        let attempts = if self.transport.is_datagram() { UDP_ATTEMPTS } else { 1 };
        let start = now();
        for attempt in 1..=attempts {
            self.transport.send(request).map_err(Failure::Io)?;
            // Waits of 1/6, 2/6 and 3/6 of the timeout over UDP (together the timeout); all of it
            // over a stream.
            let deadline = start + self.timeout * (attempt * (attempt + 1) / 2) / (attempts * (attempts + 1) / 2);
            while let Some(frame) = self.transport.recv(deadline).map_err(Failure::Io)? {
                if Answer::matches(&frame, request)
                    && let Some(answer) = Answer::parse(&frame)
                {
                    return Ok(answer);
                }
            }
        }
        Err(Failure::NoAnswer)
    }

    /// Sends a request of `method` with the attributes `body` writes, signed once a nonce is known,
    /// and answers a 401 or 438 by signing it (again): the final answer, whatever its class.
    pub fn request(&mut self, method: Method, body: impl Fn(&mut MsgWriter<'_>)) -> Result<Answer, Failure> {
        let mut rounds = 0;
        loop {
            let signed = self.session.authenticated();
            let request = self.session.request(method, &body);
            let answer = self.transact(&request)?;
            rounds += 1;
            if rounds > AUTH_ROUNDS || self.session.learn(&answer, signed) == Next::Done {
                return Ok(answer);
            }
        }
    }

    /// As [`Client::request`], an error response being a [`Failure::Refused`].
    pub fn request_success(&mut self, method: Method, body: impl Fn(&mut MsgWriter<'_>)) -> Result<Answer, Failure> {
        let answer = self.request(method, body)?;
        if answer.class() == Class::Success { Ok(answer) } else { Err(Failure::Refused(answer)) }
    }

    /// Allocates a UDP relay (of IPv6 when `ipv6`): its relayed address.
    pub fn allocate(&mut self, ipv6: bool) -> Result<SocketAddr, Failure> {
        let answer = self.request_success(Method::ALLOCATE, |w| allocate_attributes(w, ipv6))?;
        answer.relayed().ok_or(Failure::Refused(answer))
    }

    /// CreatePermission for `peer`.
    pub fn create_permission(&mut self, peer: SocketAddr) -> Result<Answer, Failure> {
        self.request(Method::CREATE_PERMISSION, |w| w.add_xor_addr(AttrType::XOR_PEER_ADDRESS, peer))
    }

    /// ChannelBind of `number` to `peer`.
    pub fn channel_bind(&mut self, number: u16, peer: SocketAddr) -> Result<Answer, Failure> {
        self.request(Method::CHANNEL_BIND, |w| channel_bind_attributes(w, number, peer))
    }

    /// Refresh with LIFETIME `lifetime` (0 deletes the allocation).
    pub fn refresh(&mut self, lifetime: u32) -> Result<Answer, Failure> {
        self.request(Method::REFRESH, |w| w.add_u32(AttrType::LIFETIME, lifetime))
    }

    /// Sends `payload` on channel `number` (padded over a stream).
    pub fn send_channel(&mut self, number: u16, payload: &[u8]) -> io::Result<()> {
        let padded = !self.transport.is_datagram();
        let frame = channel_data(number, payload, padded).ok_or(io::ErrorKind::InvalidInput)?;
        self.transport.send(&frame)
    }

    /// Sends `payload` to `peer` in a Send indication.
    pub fn send_indication(&mut self, peer: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let message = self.session.send_indication(peer, payload);
        self.transport.send(&message)
    }

    /// The next datagram or frame, whatever it is; `None` at `deadline`.
    pub fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        self.transport.recv(deadline)
    }

    /// The next relayed data (STUN messages received meanwhile are skipped); `None` at `deadline`.
    pub fn recv_data(&mut self, deadline: Instant) -> io::Result<Option<Relayed>> {
        while let Some(frame) = self.transport.recv(deadline)? {
            match Incoming::parse(&frame) {
                Some(Incoming::Channel { number, payload }) => {
                    return Ok(Some(Relayed { channel: Some(number), peer: None, payload: payload.to_vec() }));
                }
                Some(Incoming::Data { peer, payload }) => {
                    return Ok(Some(Relayed { channel: None, peer, payload: payload.to_vec() }));
                }
                Some(Incoming::Stun(_)) | None => {}
            }
        }
        Ok(None)
    }

    /// [`Client::recv_data`] within the client's timeout.
    pub fn recv_data_in_time(&mut self) -> io::Result<Option<Relayed>> {
        self.recv_data(now() + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Credentials;
    use std::collections::VecDeque;
    use turnpike_proto::{ErrorCode, StunMsg};

    /// A server in a closure: each message sent may get an answer, read back at once; nothing else
    /// arrives (a receive with an empty inbox is a timeout).
    struct Scripted<F> {
        sent: Vec<Vec<u8>>,
        inbox: VecDeque<Vec<u8>>,
        server: F,
    }

    impl<F: FnMut(usize, &StunMsg<'_>) -> Option<Vec<u8>>> Transport for Scripted<F> {
        fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
            let msg = StunMsg::parse(bytes).map_err(|e| io::Error::other(e.to_string()))?;
            if let Some(answer) = (self.server)(self.sent.len(), &msg) {
                self.inbox.push_back(answer);
            }
            self.sent.push(bytes.to_vec());
            Ok(())
        }
        fn recv(&mut self, _: Instant) -> io::Result<Option<Vec<u8>>> {
            Ok(self.inbox.pop_front())
        }
        fn is_datagram(&self) -> bool {
            true
        }
    }

    fn answer(to: &StunMsg<'_>, class: Class, body: impl FnOnce(&mut MsgWriter<'_>)) -> Vec<u8> {
        let mut buf = vec![0u8; 512];
        let mut w = MsgWriter::new(&mut buf, to.method(), class, to.transaction_id());
        body(&mut w);
        let n = w.finish().unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_lost_answer_is_sent_again_and_a_challenge_and_a_stale_nonce_are_answered() {
        let relayed: SocketAddr = "192.0.2.7:50000".parse().unwrap();
        let server = |n: usize, msg: &StunMsg<'_>| match n {
            0 => None,
            1 => Some(answer(msg, Class::Error, |w| {
                w.add_error(ErrorCode::Unauthorized, true);
                w.add_bytes(AttrType::REALM, b"r");
                w.add_bytes(AttrType::NONCE, b"n1");
            })),
            2 => Some(answer(msg, Class::Error, |w| {
                w.add_error(ErrorCode::StaleNonce, true);
                w.add_bytes(AttrType::NONCE, b"n2");
            })),
            _ => Some(answer(msg, Class::Success, |w| w.add_xor_addr(AttrType::XOR_RELAYED_ADDRESS, relayed))),
        };
        let transport = Scripted { sent: Vec::new(), inbox: VecDeque::new(), server };
        let session = Session::new(Credentials::user("alice", b"pw"), 9);
        let mut client = Client::new(transport, session, Duration::from_millis(60));
        assert_eq!(client.allocate(false).unwrap(), relayed);
        let sent = &client.transport.sent;
        assert_eq!(sent.len(), 4);
        assert_eq!(sent[0], sent[1], "the retransmission is the same request");
        let nonce = |b: &[u8]| StunMsg::parse(b).unwrap().attr(AttrType::NONCE).map(<[u8]>::to_vec);
        assert_eq!(
            (nonce(&sent[1]), nonce(&sent[2]), nonce(&sent[3])),
            (None, Some(b"n1".to_vec()), Some(b"n2".to_vec()))
        );
    }

    #[test]
    fn silence_is_no_answer_after_three_sends_and_a_refusal_is_its_code() {
        let silent = Scripted { sent: Vec::new(), inbox: VecDeque::new(), server: |_: usize, _: &StunMsg<'_>| None };
        let mut client = Client::new(silent, Session::new(Credentials::user("u", b"p"), 1), Duration::from_millis(30));
        assert!(matches!(client.refresh(0), Err(Failure::NoAnswer)));
        assert_eq!(client.transport.sent.len(), 3);
        let refusing = Scripted {
            sent: Vec::new(),
            inbox: VecDeque::new(),
            server: |_: usize, msg: &StunMsg<'_>| {
                Some(answer(msg, Class::Error, |w| w.add_error(ErrorCode::AllocationQuotaReached, true)))
            },
        };
        let mut client =
            Client::new(refusing, Session::new(Credentials::user("u", b"p"), 1), Duration::from_millis(30));
        assert_eq!(client.allocate(false).unwrap_err().code(), Some(486));
    }
}
