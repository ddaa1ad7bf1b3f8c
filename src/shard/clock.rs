//! The only place the I/O layer reads the OS clock; the sans-IO core gets `now` passed in.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The monotonic clock.
#[allow(clippy::disallowed_methods)]
pub fn now() -> Instant {
    Instant::now()
}

/// Seconds since the Unix epoch.
#[allow(clippy::disallowed_methods)]
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (the fleet's lease expiries).
#[allow(clippy::disallowed_methods)]
pub fn unix_now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// 32 bytes from the operating system's generator (`getrandom(2)`): nonce keys, and the keys of the
/// engines' relay port and token choice. There is no fallback: a server whose secrets could be
/// derived from the clock must not start, so the caller refuses to.
pub fn random_bytes() -> std::io::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    getrandom::fill(&mut out).map_err(|e| {
        std::io::Error::other(format!("the operating system's random generator failed ({e}): not starting"))
    })?;
    Ok(out)
}

/// Pauses the calling shard for `wait`: receive coalescing (`shard::coalesce`), the one place an event
/// loop sleeps. The timer slack is set small once per shard (`sys::set_timer_slack`), so the pause
/// lasts about `wait`, not the kernel's default 50 us more.
#[allow(clippy::disallowed_methods)]
pub fn pause(wait: Duration) {
    std::thread::sleep(wait);
}
