//! What an engine shares with the other engines of its node (the shards), and later of its fleet:
//! quotas, RESERVATION-TOKENs, which relayed addresses are live, and the budget of answers to
//! unauthenticated requests. The engine asks through [`Cluster`]; the host implements it (one node:
//! striped locks and atomics; a fleet: the same, synchronised through a store), so the state machine
//! never takes a lock or waits on the network itself. The building blocks that need no lock are here
//! ([`LiveRelays`], [`UnauthLimiter`], the per-user [`QuotaBook`]).

mod live;
#[cfg(any(test, feature = "local-cluster"))]
mod local;
mod quota;
mod reservations;
mod unauth;

pub use live::LiveRelays;
#[cfg(any(test, feature = "local-cluster"))]
pub use local::LocalCluster;
pub use quota::{QuotaBook, QuotaError, QuotaLimits};
pub use reservations::ReservationBook;
pub use unauth::{PREFIX_SHARE, UnauthLimiter};

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// A relay port held for a RESERVATION-TOKEN (EVEN-PORT with the R bit). The token may be presented
/// from another 5-tuple, which the kernel may steer to another shard, so reservations are shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The reserved port (taken out of the reserving engine's pool).
    pub port: u16,
    /// When the reservation lapses.
    pub expires: Instant,
    /// The user it is counted against in the quotas.
    pub holder: Box<[u8]>,
}

/// Whether a node takes new allocations (an operator's drain).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Admission {
    /// New allocations are taken.
    #[default]
    Open,
    /// Draining: a new Allocate gets 300 (Try Alternate) with this ALTERNATE-SERVER.
    Redirect(SocketAddr),
    /// Draining with nowhere to send clients: a new Allocate is refused as at capacity (486).
    Closed,
}

/// The state an engine shares with the engines beside it. Called on the control path only (Allocate,
/// Refresh, CreatePermission, ChannelBind, expiry, unauthenticated answers), except
/// [`Cluster::is_live_relay`], which the data path asks for permissions to this server's own
/// addresses; implementations answer without waiting on the network.
pub trait Cluster: Send + Sync + std::fmt::Debug {
    /// Counts one more allocation for `user` (and with `reserve` the port it reserves) against the
    /// user's limits and the total, unless that exceeds one.
    fn acquire(&self, user: &[u8], limits: QuotaLimits, reserve: bool) -> Result<(), QuotaError>;
    /// Releases one allocation of `user`.
    fn release(&self, user: &[u8]);
    /// Releases a reservation of `user` that lapsed, was redeemed by another user or was not made.
    fn release_reservation(&self, user: &[u8]);
    /// Counts a reservation of `user` again, whatever the limits (a redemption was refused after all).
    fn restore_reservation(&self, user: &[u8]);
    /// A reservation of `user` became that user's allocation: its unit stays, as the allocation's.
    fn redeem_reservation(&self, user: &[u8]);

    /// Records an outstanding RESERVATION-TOKEN.
    fn hold_reservation(&self, token: [u8; 8], reservation: Reservation);
    /// Takes out the reservation of `token` if it is valid at `now` (a lapsed one stays for
    /// [`Cluster::lapse_reservation`]).
    fn claim_reservation(&self, token: [u8; 8], now: Instant) -> Option<Reservation>;
    /// Takes out the reservation of `token` if it has lapsed at `now` (its timer fired).
    fn lapse_reservation(&self, token: [u8; 8], now: Instant) -> Option<Reservation>;

    /// A relay socket bound to `bound` now serves a live allocation.
    fn relay_opened(&self, bound: SocketAddr);
    /// The allocation the relay socket bound to `bound` served was deleted.
    fn relay_closed(&self, bound: SocketAddr);
    /// Whether `ip` (however spelled) is one of this server's own addresses.
    fn is_own_address(&self, ip: IpAddr) -> bool;
    /// Whether `addr` is the relayed address of a live allocation of this server.
    fn is_live_relay(&self, addr: SocketAddr) -> bool;

    /// Whether an answer to an unauthenticated request from `source` may go out at `now` (`rate` per
    /// second and `burst` per source; 0 = unlimited).
    fn answer_unauthenticated(&self, source: IpAddr, now: Instant, rate: u64, burst: u64) -> bool;
    /// Whether answers to unauthenticated requests are being refused (a flood).
    fn unauthenticated_flood(&self, now: Instant) -> bool;

    /// Whether an operator revoked `user` (the quota identity: a REST username's user part) until a
    /// time after `now_unix`: its Allocates and Refreshes are refused (403).
    fn revoked(&self, user: &[u8], now_unix: u64) -> bool {
        let _ = (user, now_unix);
        false
    }

    /// Whether this node takes new allocations, and where a draining one sends clients.
    fn admission(&self) -> Admission {
        Admission::Open
    }
}
