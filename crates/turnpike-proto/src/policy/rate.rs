//! Rate limiting: token buckets for bandwidth, and a limiter that keeps refusal logs from filling the
//! disk. Both take the time as an argument; neither allocates after construction.

use std::time::{Duration, Instant};

/// A token bucket over bytes (or requests): `rate` per second, holding at most `capacity`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokenBucket {
    rate: u64,
    capacity: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate: u64, capacity: u64, now: Instant) -> Self {
        Self { rate, capacity, tokens: capacity, last: now }
    }

    /// A bucket for a bandwidth limit of `bytes_per_sec`: bursts of 1/8 s, at least 16 KiB (a video
    /// key frame must not be cut up).
    pub(crate) fn for_bandwidth(bytes_per_sec: u64, now: Instant) -> Self {
        Self::new(bytes_per_sec, (bytes_per_sec / 8).max(16 * 1024), now)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        if elapsed.is_zero() {
            return;
        }
        let add = (elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.capacity);
            // Advance only by the time that produced whole tokens, so slow rates still accrue.
            let used = Duration::from_nanos((u128::from(add) * 1_000_000_000 / u128::from(self.rate.max(1))) as u64);
            self.last = if self.tokens == self.capacity { now } else { self.last + used };
        }
    }

    /// Takes `n` tokens if available.
    pub(crate) fn take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Log categories limited separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    /// A peer refused by policy.
    PeerDenied,
    /// A quota refusal.
    Quota,
    /// Wrong credentials.
    AuthFailure,
    /// A source over its unauthenticated request rate.
    RateLimited,
    /// An allocation refused for want of a relay port or socket (508).
    Capacity,
    /// A TCP or TLS connection that could not be accepted (out of descriptors, typically).
    Accept,
}

const LOG_KINDS: usize = 6;
/// Lines per category per window.
const LOG_BURST: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Lets at most 10 lines per category through per 10 s window, and reports how many were
/// suppressed when the next window opens.
#[derive(Debug)]
pub struct LogLimiter {
    window_start: [Option<Instant>; LOG_KINDS],
    printed: [u32; LOG_KINDS],
    suppressed: [u64; LOG_KINDS],
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self { window_start: [None; LOG_KINDS], printed: [0; LOG_KINDS], suppressed: [0; LOG_KINDS] }
    }
}

impl LogLimiter {
    /// Logs `message` at `level` unless its category is over its budget; the first line of a new window
    /// says how many were suppressed in the last one.
    pub fn log(&mut self, kind: LogKind, level: log::Level, now: Instant, message: std::fmt::Arguments<'_>) {
        let mut suppressed = 0;
        if self.allow(kind, now, &mut suppressed) {
            if suppressed > 0 {
                log::log!(level, "{message} ({suppressed} similar messages suppressed)");
            } else {
                log::log!(level, "{message}");
            }
        }
    }

    /// Whether a line of `kind` may be logged now. When a window closes with lines suppressed, returns
    /// that count through `suppressed` so the caller can say so.
    pub fn allow(&mut self, kind: LogKind, now: Instant, suppressed: &mut u64) -> bool {
        let k = kind as usize;
        *suppressed = 0;
        let fresh = self.window_start[k].is_none_or(|start| now.saturating_duration_since(start) >= LOG_WINDOW);
        if fresh {
            *suppressed = self.suppressed[k];
            self.window_start[k] = Some(now);
            self.printed[k] = 0;
            self.suppressed[k] = 0;
        }
        if self.printed[k] < LOG_BURST {
            self.printed[k] += 1;
            true
        } else {
            self.suppressed[k] += 1;
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn bucket_enforces_rate_over_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        let mut taken = 0u64;
        for ms in 0..=10_000u64 {
            while b.take(10, t0 + Duration::from_millis(ms)) {
                taken += 10;
            }
        }
        // 100 burst + 1000/s for 10 s.
        assert!((10_000..=10_100).contains(&taken), "{taken}");
    }

    #[test]
    fn slow_rates_still_accrue() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 1, t0);
        assert!(b.take(1, t0));
        let mut got = 0;
        for ms in (0..=10_000u64).step_by(1) {
            if b.take(1, t0 + Duration::from_millis(ms)) {
                got += 1;
            }
        }
        assert!((29..=31).contains(&got), "{got}");
    }

    #[test]
    fn log_limiter_suppresses_and_reports() {
        let t0 = Instant::now();
        let mut l = LogLimiter::default();
        let mut s = 0;
        let printed = (0..100).filter(|_| l.allow(LogKind::Quota, t0, &mut s)).count();
        assert_eq!(printed, 10);
        assert!(l.allow(LogKind::PeerDenied, t0, &mut s), "categories are independent");
        assert!(l.allow(LogKind::Quota, t0 + LOG_WINDOW, &mut s));
        assert_eq!(s, 90);
    }
}
