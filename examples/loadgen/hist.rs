//! A latency histogram with log-linear buckets: exact below 256 ns, then 128 buckets per
//! power of two (at most 0.8 % relative error). Preallocated once; recording is an index
//! computation and an increment.

/// Sub-buckets per power of two above the exact range.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Values below this are counted exactly.
const EXACT: u64 = 2 * SUB;
/// Buckets needed for the whole `u64` range.
const BUCKETS: usize = (EXACT + (63 - SUB_BITS as u64) * SUB) as usize;

#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < EXACT {
            return v as usize;
        }
        let shift = 63 - v.leading_zeros() - SUB_BITS;
        let mantissa = v >> shift; // in [SUB, 2 * SUB)
        (EXACT + u64::from(shift - 1) * SUB + (mantissa - SUB)) as usize
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < EXACT {
            return i;
        }
        let shift = (i - EXACT) / SUB + 1;
        let mantissa = (i - EXACT) % SUB + SUB;
        (mantissa << shift) + (1u64 << shift) / 2
    }

    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn min(&self) -> u64 {
        if self.total == 0 { 0 } else { self.min }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `ppm` parts per million: the middle of the smallest bucket that
    /// holds at least that share of the samples, clamped to the observed extremes.
    pub fn quantile_ppm(&self, ppm: u32) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = u128::from(self.total) * u128::from(ppm.min(1_000_000));
        let rank = u64::try_from(rank.div_ceil(1_000_000))
            .unwrap_or(self.total)
            .clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_index_is_monotonic_and_in_range() {
        let mut last = 0;
        for v in 0..100_000u64 {
            let i = Histogram::index(v);
            assert!(i >= last, "{v}");
            last = i;
        }
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn bucket_middle_is_within_one_percent() {
        let samples = (0..100_000u64).chain((8..63).map(|s| (1u64 << s) + 12_345));
        for v in samples {
            let mid = Histogram::value(Histogram::index(v));
            assert!(mid.abs_diff(v) <= v / 100, "{v} -> {mid}");
        }
    }

    #[test]
    fn quantiles_of_a_uniform_range() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        assert!(h.quantile_ppm(500_000).abs_diff(50_000) <= 500);
        assert!(h.quantile_ppm(999_000).abs_diff(99_900) <= 999);
        assert_eq!(h.quantile_ppm(1_000_000), 100_000);
        assert_eq!(h.min(), 1);
        assert_eq!(h.count(), 100_000);
    }
}
