//! # turnpike-client
//!
//! The one TURN client of the turnpike workspace, on the codec of [`turnpike_proto`]. `turnpike probe`,
//! the integration tests and the load generator all speak TURN through it.
//!
//! It comes in two layers, like the server:
//! - [`Session`] is sans-IO: it builds requests (transaction IDs, long-term credentials, FINGERPRINT),
//!   learns the realm and nonce from a 401 or 438 answer and says whether to send again
//!   ([`Session::learn`]), and writes ChannelData and Send indications. [`Answer`] holds a received
//!   message; [`Incoming`] tells relayed data from STUN. The load generator drives sessions from its
//!   own event loop.
//! - [`Client`] is blocking: a session over a [`Transport`] ([`Udp`], or [`Framed`] TCP or TLS), with
//!   retransmission over UDP, deadlines, and the allocate / permission / channel / refresh requests.
//!
//! [`TurnUri`] parses `turn:` and `turns:` URIs (RFC 7065); [`tls`] makes the rustls side of `turns:`.

#![forbid(unsafe_code)]

mod client;
mod message;
mod session;
pub mod tls;
mod transport;
mod uri;

pub use client::{Client, Failure, Relayed};
pub use message::{Answer, Incoming, channel_data};
pub use session::{Credentials, Next, Session, allocate_attributes, channel_bind_attributes};
pub use transport::{Framed, ReadTimeout, Transport, Udp};
pub use uri::{TurnUri, UriTransport};
