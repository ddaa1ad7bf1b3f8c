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

/// 32 bytes of OS randomness (nonce keys, port shuffles). Falls back to clock-and-address entropy only if
/// /dev/urandom is unreadable, which a Linux system never is.
pub fn random_bytes() -> [u8; 32] {
    use std::io::Read;
    let mut out = [0u8; 32];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut out)).is_ok() {
        return out;
    }
    use std::hash::{BuildHasher, Hasher};
    for chunk in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(now().elapsed().as_nanos());
        chunk.copy_from_slice(&h.finish().to_be_bytes()[..chunk.len()]);
    }
    out
}

/// Pauses the calling shard for `wait`: receive coalescing (`shard::coalesce`), the one place an event
/// loop sleeps. The timer slack is set small once per shard (`sys::set_timer_slack`), so the pause
/// lasts about `wait`, not the kernel's default 50 us more.
#[allow(clippy::disallowed_methods)]
pub fn pause(wait: Duration) {
    std::thread::sleep(wait);
}
