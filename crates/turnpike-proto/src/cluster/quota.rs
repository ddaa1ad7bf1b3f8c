//! The accounting of allocations per user: a plain book (no lock, no total) that a [`super::Cluster`]
//! keeps behind whatever synchronisation it uses, beside its own count of the total.

use std::collections::HashMap;

/// Why an allocation was refused by quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaError {
    /// The user holds `user-quota` allocations (and reservations) already.
    User,
    /// The server holds `total-quota` allocations (and reservations) already.
    Total,
    /// The user holds `allocations.user_reservations` unredeemed EVEN-PORT reservations already.
    Reservations,
}

/// The limits an Allocate is checked against (`user` and `total`: 0 = unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Allocations plus reservations per user.
    pub user: u32,
    /// Allocations plus reservations in total.
    pub total: u32,
    /// Unredeemed reservations per user (0: none).
    pub user_reservations: u32,
}

/// What one user holds: quota units (an allocation or a reserved port each) and, among them,
/// reservations.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    units: u32,
    reservations: u32,
}

/// Quota units per user. A port reserved by EVEN-PORT with the R bit counts as an allocation of the
/// user who reserved it until it is redeemed (then it is the new allocation's unit) or lapses: a
/// reservation holds a relay port as an allocation does, so a user within quota cannot hold more of
/// the range than the quota says.
#[derive(Debug, Default)]
pub struct QuotaBook {
    users: HashMap<Box<[u8]>, Held>,
}

impl QuotaBook {
    /// Counts one more allocation for `user` and, with `reserve`, the port it reserves, unless that
    /// exceeds the user's limits (the total is the caller's to count).
    pub fn acquire(&mut self, user: &[u8], limits: QuotaLimits, reserve: bool) -> Result<(), QuotaError> {
        let units = 1 + u32::from(reserve);
        let held = self.users.get(user).copied().unwrap_or_default();
        if limits.user > 0 && held.units.saturating_add(units) > limits.user {
            return Err(QuotaError::User);
        }
        if reserve && held.reservations >= limits.user_reservations {
            return Err(QuotaError::Reservations);
        }
        let entry = self.users.entry(user.into()).or_default();
        entry.units += units;
        entry.reservations += u32::from(reserve);
        Ok(())
    }

    /// Releases one unit of `user`: an allocation, or with `reservation` a reservation that lapsed or
    /// was not made after all. False when the user held none (nothing was released).
    pub fn release(&mut self, user: &[u8], reservation: bool) -> bool {
        let Some(held) = self.users.get_mut(user) else {
            return false;
        };
        if held.units == 0 {
            return false;
        }
        held.units -= 1;
        if reservation {
            held.reservations = held.reservations.saturating_sub(1);
        }
        if held.units == 0 {
            self.users.remove(user);
        }
        true
    }

    /// Counts a reservation of `user` again, whatever the limits: one released for a redemption that
    /// was then refused.
    pub fn restore_reservation(&mut self, user: &[u8]) {
        let entry = self.users.entry(user.into()).or_default();
        entry.units += 1;
        entry.reservations += 1;
    }

    /// A reservation of `user` was redeemed by an allocation of the same user: its unit becomes the
    /// allocation's.
    pub fn redeem_reservation(&mut self, user: &[u8]) {
        if let Some(held) = self.users.get_mut(user) {
            held.reservations = held.reservations.saturating_sub(1);
        }
    }

    /// The quota units (allocations plus reservations) `user` holds.
    pub fn held_by(&self, user: &[u8]) -> u32 {
        self.users.get(user).map_or(0, |h| h.units)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QuotaLimits = QuotaLimits { user: 2, total: 0, user_reservations: 1 };

    #[test]
    fn a_reservation_counts_until_it_lapses_or_is_redeemed() {
        let mut q = QuotaBook::default();
        // An allocation with a reservation is two units.
        assert!(q.acquire(b"alice", LIMITS, true).is_ok());
        assert_eq!(q.held_by(b"alice"), 2);
        assert_eq!(q.acquire(b"alice", LIMITS, false), Err(QuotaError::User));
        // Deleting the allocation leaves the reservation counted.
        assert!(q.release(b"alice", false));
        assert_eq!(q.held_by(b"alice"), 1);
        // One reservation at a time (user_reservations 1).
        let roomy = QuotaLimits { user: 0, total: 0, user_reservations: 1 };
        assert_eq!(q.acquire(b"alice", roomy, true), Err(QuotaError::Reservations));
        // Lapsing frees it.
        assert!(q.release(b"alice", true));
        assert_eq!(q.held_by(b"alice"), 0);
        assert!(!q.release(b"alice", false), "nothing held, nothing released");
        // Redeemed by the same user, the unit becomes the allocation's and the reservation slot frees.
        assert!(q.acquire(b"dave", roomy, true).is_ok());
        q.redeem_reservation(b"dave");
        assert_eq!(q.held_by(b"dave"), 2);
        assert!(q.acquire(b"dave", roomy, true).is_ok());
        assert_eq!(q.held_by(b"dave"), 4);
        // Restored whatever the limits.
        q.restore_reservation(b"erin");
        assert_eq!(q.held_by(b"erin"), 1);
        assert!(q.release(b"erin", true));
    }
}
