//! Outstanding RESERVATION-TOKENs and the rules for taking one out: redeemed only before it lapses,
//! lapsed only once it has. A `Cluster` keeps one behind whatever lock it uses.

use super::Reservation;
use std::collections::HashMap;
use std::time::Instant;

/// Reservations by token.
#[derive(Debug, Default)]
pub struct ReservationBook {
    by_token: HashMap<[u8; 8], Reservation>,
}

impl ReservationBook {
    /// Holds `reservation` under `token`.
    pub fn hold(&mut self, token: [u8; 8], reservation: Reservation) {
        self.by_token.insert(token, reservation);
    }

    /// Takes out the reservation of `token` if it has not lapsed at `now`.
    pub fn claim(&mut self, token: [u8; 8], now: Instant) -> Option<Reservation> {
        self.take_if(token, |r| now < r.expires)
    }

    /// Takes out the reservation of `token` if it has lapsed at `now` (its timer fired; a claimed
    /// one is gone already).
    pub fn lapse(&mut self, token: [u8; 8], now: Instant) -> Option<Reservation> {
        self.take_if(token, |r| r.expires <= now)
    }

    /// Outstanding reservations.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// Whether none is outstanding.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }

    fn take_if(&mut self, token: [u8; 8], keep: impl Fn(&Reservation) -> bool) -> Option<Reservation> {
        if self.by_token.get(&token).is_some_and(keep) { self.by_token.remove(&token) } else { None }
    }
}
