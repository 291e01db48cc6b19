//! Latency histograms with log-linear buckets: four to each power of two, from one microsecond
//! to about two minutes, so that every bucket is at most a quarter wider than the one before
//! and every bound is a whole multiple of a quarter microsecond (1, 1.25, 1.5, 1.75, 2, 2.5,
//! 3, 3.5, 4, 5 µs ...).
//!
//! [`AtomicHistogram`] is written by one thread (the poller that owns its queue) with a load
//! and a store per counter, and read by any; [`Histogram`] is what a reader gets: plain counts
//! that add up, subtract (the requests of an interval) and give quantiles.

use std::sync::atomic::{AtomicU64, Ordering};

use super::bump;
use crate::clock::Clock;

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 2;
const SUB: u64 = 1 << SUB_BITS;
/// The finest bucket width, a quarter microsecond: every bound is a multiple of it.
const UNIT_NS: u64 = 250;
/// Powers of two above the first microsecond: the last finite bound is
/// `UNIT_NS × 2^(OCTAVES - 1) × 2 × SUB` ns, about 134 s.
const OCTAVES: usize = 27;
/// Buckets: up to 1 µs, four per power of two above it, and one for anything longer.
pub const BUCKETS: usize = 1 + OCTAVES * SUB as usize + 1;

/// The bucket of a latency of `q` whole quarter microseconds ([`Clock::quarter_us`]): bucket
/// `i` holds latencies above the upper bound of bucket `i - 1` and up to its own
/// ([`upper_bound_ns`]), as Prometheus's `le` (less or equal) says, to the clock's precision.
#[inline(always)]
pub fn bucket(q: u64) -> usize {
    if q < SUB {
        return 0;
    }
    // q is in [SUB × 2^k, 2 × SUB × 2^k): power k, then which quarter of it.
    let k = 63 - q.leading_zeros() - SUB_BITS;
    let j = (q >> k) - SUB;
    (1 + (k as usize) * SUB as usize + j as usize).min(BUCKETS - 1)
}

/// The largest latency bucket `i` holds, in nanoseconds; `None` for the last one, which has
/// no bound.
pub fn upper_bound_ns(i: usize) -> Option<u64> {
    match i {
        0 => Some(UNIT_NS * SUB),
        i if i < BUCKETS - 1 => {
            let k = (i - 1) / SUB as usize;
            let j = ((i - 1) % SUB as usize) as u64;
            Some((UNIT_NS << k) * (SUB + 1 + j))
        }
        _ => None,
    }
}

/// The upper bounds of every bucket but the last, in nanoseconds.
pub fn bounds_ns() -> impl Iterator<Item = u64> {
    (0..BUCKETS).map_while(upper_bound_ns)
}

/// A histogram one thread writes and any thread reads.
#[derive(Debug)]
pub struct AtomicHistogram {
    counts: [AtomicU64; BUCKETS],
    /// In ticks of the clock: converted when read.
    sum_ticks: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; BUCKETS],
            sum_ticks: AtomicU64::new(0),
        }
    }
}

impl AtomicHistogram {
    /// Counts one latency of `ticks` of `clock`. Only the histogram's one writer may call it.
    #[inline(always)]
    pub fn record(&self, ticks: u64, clock: &Clock) {
        bump(&self.counts[bucket(clock.quarter_us(ticks))], 1);
        bump(&self.sum_ticks, ticks);
    }

    /// The counts as they are now, the sum in nanoseconds of `clock`, which recorded them.
    pub fn load(&self, clock: &Clock) -> Histogram {
        let mut h = Histogram::default();
        for (to, from) in h.counts.iter_mut().zip(&self.counts) {
            *to = from.load(Ordering::Relaxed);
        }
        h.sum_ns = clock.nanos(self.sum_ticks.load(Ordering::Relaxed));
        h
    }
}

/// Latencies counted by bucket, and their sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Requests per bucket ([`upper_bound_ns`]).
    pub counts: [u64; BUCKETS],
    /// The latencies added up, in nanoseconds.
    pub sum_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            sum_ns: 0,
        }
    }
}

impl Histogram {
    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other`'s requests to these.
    pub fn add(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    /// The requests counted since `earlier`, a reading of the same counters.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let mut d = self.clone();
        for (a, b) in d.counts.iter_mut().zip(&earlier.counts) {
            *a = a.wrapping_sub(*b);
        }
        d.sum_ns = d.sum_ns.wrapping_sub(earlier.sum_ns);
        d
    }

    /// The latency, in nanoseconds, below which a fraction `q` (0 to 1) of the requests
    /// fall: interpolated linearly inside the bucket it lands in, as Prometheus's
    /// `histogram_quantile` does, and the last finite bound when it lands in the last bucket.
    /// `None` when nothing was counted.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let lower = if i == 0 {
                    0
                } else {
                    upper_bound_ns(i - 1).unwrap_or(0)
                };
                let Some(upper) = upper_bound_ns(i) else {
                    return Some(lower as f64);
                };
                let within = (rank - below as f64) / n as f64;
                return Some(lower as f64 + (upper - lower) as f64 * within);
            }
            below += n;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ticks are nanoseconds.
    fn ns() -> Clock {
        Clock::monotonic()
    }

    #[test]
    fn bounds_are_quarters_of_each_power_of_two_from_one_microsecond() {
        let first: Vec<u64> = bounds_ns().take(10).collect();
        assert_eq!(
            first,
            [1000, 1250, 1500, 1750, 2000, 2500, 3000, 3500, 4000, 5000]
        );
        assert_eq!(bounds_ns().count(), BUCKETS - 1);
        let last = bounds_ns().last().expect("bounds");
        assert_eq!(last, 134_217_728_000, "about two minutes");
        let all: Vec<u64> = bounds_ns().collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "increasing");
        assert!(
            all.windows(2).all(|w| w[1] * 4 <= w[0] * 5),
            "no bucket more than a quarter wider than its lower bound"
        );
    }

    #[test]
    fn a_latency_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let clock = ns();
        let bucket_ns = |ns| bucket(clock.quarter_us(ns));
        for (ns, i) in [
            (0, 0),
            (1, 0),
            (1000, 0),
            (1001, 1),
            (1250, 1),
            (1251, 2),
            (2000, 4),
            (2001, 5),
            (4000, 8),
            (4001, 9),
            (1_000_000, 40),
            (134_217_728_001, BUCKETS - 1),
            (u64::MAX, BUCKETS - 1),
        ] {
            assert_eq!(bucket_ns(ns), i, "{ns} ns");
        }
        // Every bound in quarter microseconds, and the next quarter.
        for (i, b) in bounds_ns().enumerate() {
            let q = b / UNIT_NS;
            assert_eq!(bucket(q - 1), i, "just below bound {b}");
            assert_eq!(bucket(q), i + 1, "from bound {b} on");
        }
    }

    #[test]
    fn recorded_latencies_are_counted_in_their_buckets_and_summed() {
        let (h, clock) = (AtomicHistogram::default(), ns());
        for ns in [500, 1100, 1100, 3_000_000] {
            h.record(ns, &clock);
        }
        let got = h.load(&clock);
        assert_eq!(got.count(), 4);
        assert_eq!(got.sum_ns, 3_002_700);
        assert_eq!(got.counts[0], 1);
        assert_eq!(got.counts[1], 2);
        assert_eq!(got.counts[bucket(3_000_000 / UNIT_NS)], 1);
    }

    #[test]
    fn quantiles_of_an_interval_come_from_the_difference_of_two_readings() {
        let (h, clock) = (AtomicHistogram::default(), ns());
        // Before the interval: slow requests that must not count in it.
        for _ in 0..100 {
            h.record(50_000_000, &clock);
        }
        let before = h.load(&clock);
        // The interval: 90 requests in (1, 1.25] µs, 10 in (3.5, 4] µs.
        for _ in 0..90 {
            h.record(1200, &clock);
        }
        for _ in 0..10 {
            h.record(3900, &clock);
        }
        let d = h.load(&clock).since(&before);
        assert_eq!(d.count(), 100);
        assert_eq!(d.sum_ns, 90 * 1200 + 10 * 3900);
        // The 50th request is 50/90 into (1000, 1250].
        let p50 = d.quantile(0.5).expect("p50");
        assert!((p50 - (1000.0 + 250.0 * 50.0 / 90.0)).abs() < 1e-6, "{p50}");
        // The 95th is half-way into (3500, 4000].
        let p95 = d.quantile(0.95).expect("p95");
        assert!((p95 - 3750.0).abs() < 1e-6, "{p95}");
        assert_eq!(d.quantile(1.0), Some(4000.0));
        assert_eq!(Histogram::default().quantile(0.5), None, "nothing counted");
    }

    #[test]
    fn a_quantile_in_the_unbounded_bucket_is_the_last_bound() {
        let (h, clock) = (AtomicHistogram::default(), ns());
        h.record(u64::MAX / 2, &clock);
        assert_eq!(h.load(&clock).quantile(0.99), Some(134_217_728_000.0));
    }

    #[test]
    fn histograms_add_up() {
        let (a, b, clock) = (AtomicHistogram::default(), AtomicHistogram::default(), ns());
        a.record(900, &clock);
        b.record(900, &clock);
        b.record(2_000_000_000, &clock);
        let mut sum = a.load(&clock);
        sum.add(&b.load(&clock));
        assert_eq!(sum.count(), 3);
        assert_eq!(sum.counts[0], 2);
        assert_eq!(sum.sum_ns, 2_000_001_800);
    }
}
