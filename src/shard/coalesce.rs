//! Receive coalescing: a busy shard waits a little before polling again, so that each wake-up finds a
//! batch of datagrams instead of one or two.
//!
//! On loopback and on NICs without interrupt moderation, datagrams that arrive one by one wake the
//! shard one by one: at 100,000 datagrams/s it measured about four per wake-up, and every wake-up
//! costs a context switch, an `epoll_wait` and a `recvmmsg` whatever it finds. A NIC's interrupt
//! coalescing (`ethtool -C rx-usecs`) trades a few microseconds of latency for fewer interrupts; this
//! does the same for the event loop. While the shard's datagram rate is at least `min_rate`, a wake-up
//! that handled datagrams and emptied every socket is followed by a pause of `batch / rate` seconds,
//! at most `max_wait`: about one receive batch accumulates meanwhile, so the socket buffers never hold
//! much more than one batch, and the added latency is bounded by `max_wait`. Below `min_rate` (a shard
//! with little traffic, where the CPU saved would not matter) the shard never waits.
//!
//! Sans-IO like the engine: the caller passes `now` and performs the pause (see `clock::pause`).

use std::time::{Duration, Instant};

/// How long the datagram rate is counted before it is re-estimated.
pub(crate) const RATE_WINDOW: Duration = Duration::from_millis(10);

/// The coalescing rule of one shard, with its running rate estimate.
#[derive(Debug)]
pub(crate) struct Coalescer {
    max_wait: Duration,
    min_rate: u64,
    batch: u64,
    window_start: Instant,
    window_datagrams: u64,
    /// Datagrams per second over the last complete window.
    rate: u64,
}

impl Coalescer {
    /// A rule that waits at most `max_wait` (zero: never) once the shard receives at least `min_rate`
    /// datagrams per second, aiming at `batch` datagrams per wake-up.
    pub(crate) fn new(now: Instant, max_wait: Duration, min_rate: u64, batch: usize) -> Self {
        Self {
            max_wait,
            min_rate: min_rate.max(1),
            batch: batch.max(1) as u64,
            window_start: now,
            window_datagrams: 0,
            rate: 0,
        }
    }

    /// Records a wake-up at `now` that handled `datagrams` datagrams and left no socket with more
    /// waiting (`drained`), and returns how long to pause before polling again (zero: poll at once).
    pub(crate) fn after_wake(&mut self, now: Instant, datagrams: usize, drained: bool) -> Duration {
        self.window_datagrams += datagrams as u64;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= RATE_WINDOW {
            let nanos = elapsed.as_nanos().max(1);
            self.rate = u64::try_from(u128::from(self.window_datagrams) * 1_000_000_000 / nanos).unwrap_or(u64::MAX);
            self.window_start = now;
            self.window_datagrams = 0;
        }
        if self.max_wait.is_zero() || !drained || datagrams == 0 || self.rate < self.min_rate {
            return Duration::ZERO;
        }
        let wait_nanos = self.batch.saturating_mul(1_000_000_000) / self.rate.max(1);
        Duration::from_nanos(wait_nanos).min(self.max_wait)
    }

    /// Datagrams per second over the last complete window.
    #[cfg(test)]
    pub(crate) fn rate(&self) -> u64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::clock;

    const MAX: Duration = Duration::from_micros(300);

    /// Feeds `rate` datagrams/s from `start` as `wakes` wake-ups of `per_wake` datagrams each, every one
    /// having emptied the sockets; returns the time of the last wake-up and the pause it was given.
    fn feed(c: &mut Coalescer, start: Instant, rate: u64, per_wake: u64, wakes: u64) -> (Instant, Duration) {
        let step = Duration::from_nanos(per_wake * 1_000_000_000 / rate);
        let mut now = start;
        let mut wait = Duration::ZERO;
        for _ in 0..wakes {
            now += step;
            wait = c.after_wake(now, per_wake as usize, true);
        }
        (now, wait)
    }

    #[test]
    fn a_quiet_shard_never_waits() {
        let t0 = clock::now();
        let mut c = Coalescer::new(t0, MAX, 20_000, 64);
        let (_, wait) = feed(&mut c, t0, 5_000, 1, 200);
        assert_eq!(c.rate(), 5_000);
        assert_eq!(wait, Duration::ZERO);
    }

    #[test]
    fn a_busy_shard_waits_for_about_one_batch_at_most_max_wait() {
        let t0 = clock::now();
        let mut c = Coalescer::new(t0, MAX, 20_000, 64);
        // 100k/s: one batch takes 640 us, more than the cap.
        let (now, wait) = feed(&mut c, t0, 100_000, 4, 1_000);
        assert_eq!(c.rate(), 100_000);
        assert_eq!(wait, MAX);
        // 400k/s: one batch in 160 us.
        let (_, wait) = feed(&mut c, now, 400_000, 16, 1_000);
        assert_eq!(c.rate(), 400_000);
        assert_eq!(wait, Duration::from_micros(160));
    }

    #[test]
    fn no_wait_without_datagrams_or_with_more_waiting_or_when_off() {
        let t0 = clock::now();
        let mut c = Coalescer::new(t0, MAX, 20_000, 64);
        let (now, wait) = feed(&mut c, t0, 100_000, 4, 1_000);
        assert_eq!(wait, MAX);
        assert_eq!(c.after_wake(now, 0, true), Duration::ZERO, "a timer or control wake-up");
        assert_eq!(c.after_wake(now, 64, false), Duration::ZERO, "a socket still has datagrams");
        let mut off = Coalescer::new(t0, Duration::ZERO, 20_000, 64);
        let (_, wait) = feed(&mut off, t0, 100_000, 4, 1_000);
        assert_eq!(wait, Duration::ZERO);
    }

    #[test]
    fn the_rate_falls_when_traffic_stops() {
        let t0 = clock::now();
        let mut c = Coalescer::new(t0, MAX, 20_000, 64);
        let (now, _) = feed(&mut c, t0, 100_000, 4, 1_000);
        // One datagram after a second of silence: the window spans the silence.
        assert_eq!(c.after_wake(now + Duration::from_secs(1), 1, true), Duration::ZERO);
        assert!(c.rate() < 20_000);
    }
}
