//! Latency histograms of the traffic window.

/// A microsecond latency histogram (1 us buckets up to 100 ms, then overflow), allocated up front.
pub(crate) struct Histogram {
    buckets: Vec<u32>,
    count: u64,
}

impl Histogram {
    /// An empty histogram.
    pub(crate) fn new() -> Self {
        Self { buckets: vec![0; 100_001], count: 0 }
    }
    /// Counts one latency of `us` microseconds (100 ms or more in the overflow bucket).
    pub(crate) fn record(&mut self, us: u64) {
        let i = (us as usize).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
    }
    /// The smallest latency (us) at or below which a fraction `p` of the recorded ones lie; 0 when
    /// nothing was recorded.
    pub(crate) fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = ((self.count as f64) * p).ceil() as u64;
        let mut seen = 0u64;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += u64::from(c);
            if seen >= want.max(1) {
                return i as u64;
            }
        }
        self.buckets.len() as u64
    }
}

/// Latency histograms of the traffic window: from the generator's send to the kernel's arrival stamp
/// (what the server added), and to the generator reading the datagram (also the generator's own delay).
pub(crate) struct Latency {
    /// Send to the kernel's arrival stamp at the receiving socket.
    pub added: Histogram,
    /// Send to this generator reading it.
    pub observed: Histogram,
    /// Datagrams that came without a kernel stamp (their added latency is the observed one).
    pub unstamped: u64,
}

impl Latency {
    /// Empty histograms.
    pub(crate) fn new() -> Self {
        Self { added: Histogram::new(), observed: Histogram::new(), unstamped: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_one_to_a_hundred() {
        let mut h = Histogram::new();
        assert_eq!(h.percentile(0.99), 0);
        for us in 1..=100 {
            h.record(us);
        }
        assert_eq!(h.percentile(0.5), 50);
        assert_eq!(h.percentile(0.99), 99);
        assert_eq!(h.percentile(1.0), 100);
        // Beyond 100 ms everything lands in the overflow bucket, which the top percentiles then name.
        for _ in 0..1000 {
            h.record(5_000_000);
        }
        assert_eq!(h.percentile(0.99), 100_000);
    }
}
