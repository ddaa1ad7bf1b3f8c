//! A hashed timer wheel with one-second slots: O(1) insert, expiry work proportional to what is due.
//! Entries are re-checked lazily against the real deadline of their object when they fire, so a refresh
//! needs no timer operation.

use std::time::{Duration, Instant};

/// Slots in the wheel: one rotation spans this many seconds. Deadlines further out stay in their slot
/// across rotations until due.
const SLOTS: usize = 4096;

/// Entries beyond twice the live ones tolerated before [`TimerWheel::sweep_stale`] sweeps.
pub(crate) const SWEEP_SLACK: usize = 4096;

/// Entries one [`TimerWheel::sweep_stale`] call visits, about 0.1 ms of work (a sweep continues over
/// the following calls).
pub(crate) const SWEEP_STEP: usize = 4096;

/// A timer wheel holding `T` items.
#[derive(Debug)]
pub struct TimerWheel<T> {
    origin: Instant,
    slots: Vec<Vec<(u64, T)>>,
    /// The next second not yet processed.
    next_sec: u64,
    len: usize,
    /// Entries kept by the last complete sweep.
    kept_by_sweep: usize,
    /// The next slot of the sweep in progress, if one is.
    sweep_at: Option<usize>,
}

impl<T: Copy> TimerWheel<T> {
    /// An empty wheel whose second 0 starts at `origin`.
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            next_sec: 0,
            len: 0,
            kept_by_sweep: 0,
            sweep_at: None,
        }
    }

    /// Number of pending entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no entry is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn sec_ceil(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.origin);
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }

    /// Schedules `item` to fire at the first tick at or after `deadline`.
    pub fn insert(&mut self, deadline: Instant, item: T) {
        let sec = self.sec_ceil(deadline).max(self.next_sec);
        self.slots[(sec % SLOTS as u64) as usize].push((sec, item));
        self.len += 1;
    }

    /// The instant of the next tick worth waking for, if anything is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        (self.len > 0).then(|| self.origin + Duration::from_secs(self.next_sec))
    }

    /// Drops stale entries (those `keep` rejects) once the wheel holds more than twice the `live`
    /// entries and twice what the last sweep kept, plus `SWEEP_SLACK` (4096); returns how many it dropped.
    ///
    /// Owners drop entries lazily (a deleted object's entry stays until its deadline), which costs
    /// nothing per delete but would let a remote that creates and deletes objects in a loop grow the
    /// wheel by its whole churn over a lifetime (600 s at 100k deletes/s is 60 M entries). A sweep
    /// follows at least `SWEEP_SLACK` inserts since the last one, so its cost per insert is constant.
    /// The second bound keeps entries the owner does not count as `live` from causing a sweep at every
    /// call. One call visits about `SWEEP_STEP` (4096) entries: a sweep of a large wheel (600,000 entries took
    /// 17 ms in one go) is spread over the calls that follow, which the owner makes once per wake-up.
    pub fn sweep_stale(&mut self, live: usize, mut keep: impl FnMut(&T) -> bool) -> usize {
        let mut at = match self.sweep_at {
            Some(at) => at,
            None => {
                let pending = self.len;
                if pending <= 2 * live + SWEEP_SLACK || pending <= 2 * self.kept_by_sweep + SWEEP_SLACK {
                    return 0;
                }
                0
            }
        };
        let (mut visited, mut dropped) = (0, 0);
        while at < SLOTS && visited < SWEEP_STEP {
            let slot = &mut self.slots[at];
            let before = slot.len();
            slot.retain(|(_, item)| keep(item));
            if slot.capacity() > 2 * slot.len() + 8 {
                slot.shrink_to(2 * slot.len());
            }
            visited += before;
            dropped += before - slot.len();
            at += 1;
        }
        self.len -= dropped;
        if at == SLOTS {
            self.sweep_at = None;
            self.kept_by_sweep = self.len;
        } else {
            self.sweep_at = Some(at);
        }
        dropped
    }

    /// Moves the wheel to `now`, appends every item due to the backlog `due`, and hands out at most
    /// `budget` of the backlog, oldest first; the rest stay in `due` for the next call.
    pub fn drain_due<'d>(&mut self, now: Instant, due: &'d mut Vec<T>, budget: usize) -> std::vec::Drain<'d, T> {
        self.advance(now, due);
        let n = due.len().min(budget);
        due.drain(..n)
    }

    /// Moves the wheel to `now`, appending every due item to `due`.
    pub fn advance(&mut self, now: Instant, due: &mut Vec<T>) {
        let target = now.saturating_duration_since(self.origin).as_secs();
        if target < self.next_sec {
            return;
        }
        // Visiting each slot once is enough, however long we were away.
        let steps = (target - self.next_sec + 1).min(SLOTS as u64);
        for i in 0..steps {
            let slot = &mut self.slots[((self.next_sec + i) % SLOTS as u64) as usize];
            let before = slot.len();
            slot.retain(|&(sec, item)| {
                if sec <= target {
                    due.push(item);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
        }
        self.next_sec = target + 1;
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fires_at_the_deadline_not_before() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        w.insert(t0 + Duration::from_millis(2500), 1u32);
        let mut due = Vec::new();
        w.advance(t0 + Duration::from_secs(2), &mut due);
        assert!(due.is_empty());
        w.advance(t0 + Duration::from_secs(3), &mut due);
        assert_eq!(due, [1]);
        assert!(w.is_empty());
    }

    #[test]
    fn long_deadlines_survive_rotations() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        w.insert(t0 + Duration::from_secs(SLOTS as u64 * 2 + 5), 9u32);
        let mut due = Vec::new();
        for s in 0..(SLOTS as u64 * 2 + 4) {
            w.advance(t0 + Duration::from_secs(s), &mut due);
        }
        assert!(due.is_empty());
        w.advance(t0 + Duration::from_secs(SLOTS as u64 * 2 + 5), &mut due);
        assert_eq!(due, [9]);
    }

    /// A wheel holding items `0..n`, item `i` due `i % spread + 1` seconds after the returned origin.
    fn wheel_of(n: u32, spread: u32) -> (Instant, TimerWheel<u32>) {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        for i in 0..n {
            w.insert(t0 + Duration::from_secs(u64::from(i % spread) + 1), i);
        }
        (t0, w)
    }

    /// Runs a sweep to its end; returns the entries dropped and the calls it took.
    fn sweep_fully(w: &mut TimerWheel<u32>, live: usize, keep: impl Fn(&u32) -> bool) -> (usize, usize) {
        let (mut dropped, mut calls) = (w.sweep_stale(live, &keep), 1);
        while w.sweep_at.is_some() {
            dropped += w.sweep_stale(live, &keep);
            calls += 1;
        }
        (dropped, calls)
    }

    #[test]
    fn sweep_drops_stale_entries_and_the_rest_still_fire() {
        let n = 3 * SWEEP_SLACK as u32;
        let (t0, mut w) = wheel_of(n, 7);
        let (dropped, _) = sweep_fully(&mut w, 0, |&i| i % 10 == 0);
        let kept = (0..n).filter(|i| i % 10 == 0).count();
        assert_eq!((dropped, w.len()), (n as usize - kept, kept));
        let mut due = Vec::new();
        w.advance(t0 + Duration::from_secs(8), &mut due);
        due.sort_unstable();
        assert_eq!(due, (0..n).filter(|i| i % 10 == 0).collect::<Vec<_>>());
        assert!(w.is_empty());
    }

    #[test]
    fn sweeps_only_when_stale_entries_outnumber_live_ones() {
        let n = 2 * SWEEP_SLACK as u32;
        let (t0, mut w) = wheel_of(n, 60);
        // Half live: 2 x 4096 + 4096 > 8192 pending, so nothing is swept.
        assert_eq!(w.sweep_stale(n as usize / 2, |&i| i % 2 == 0), 0);
        assert_eq!(sweep_fully(&mut w, 10, |&i| i < 10).0, n as usize - 10);
        assert_eq!(w.len(), 10);
        // Right after a sweep, a few new entries do not trigger another.
        for i in 0..100 {
            w.insert(t0 + Duration::from_secs(60), n + i);
        }
        assert_eq!(w.sweep_stale(0, |_| false), 0);
    }

    #[test]
    fn a_large_sweep_is_spread_over_calls() {
        let n = 20 * SWEEP_STEP as u32;
        let (_, mut w) = wheel_of(n, 600);
        let first = w.sweep_stale(0, |_| false);
        assert!(first > 0 && first < 2 * SWEEP_STEP, "one call visits about SWEEP_STEP entries: {first}");
        let (rest, calls) = sweep_fully(&mut w, 0, |_| false);
        assert_eq!(first + rest, n as usize);
        assert!(calls >= 19, "{calls}");
        assert!(w.is_empty());
    }

    proptest! {
        #[test]
        fn each_deadline_fires_exactly_once(deadlines in proptest::collection::vec(0u64..10_000, 1..100),
                                           steps in proptest::collection::vec(1u64..700, 1..60)) {
            let t0 = Instant::now();
            let mut w = TimerWheel::new(t0);
            for (i, d) in deadlines.iter().enumerate() {
                w.insert(t0 + Duration::from_millis(*d * 37), i);
            }
            let mut due = Vec::new();
            let mut now = 0u64;
            for s in steps {
                now += s;
                let before = due.len();
                w.advance(t0 + Duration::from_secs(now), &mut due);
                for &i in &due[before..] {
                    prop_assert!(deadlines[i] * 37 <= now * 1000);
                }
            }
            w.advance(t0 + Duration::from_secs(now + 400_000), &mut due);
            due.sort_unstable();
            prop_assert_eq!(due, (0..deadlines.len()).collect::<Vec<_>>());
        }
    }
}
