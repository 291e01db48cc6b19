//! The limits of a device or of a group of devices, as configured: operations and bytes per
//! second, of reads, writes and both, and the burst allowance.

use std::time::Duration;

use super::bucket::{Bucket, Kind};
use crate::clock::Clock;

/// Burst allowance of limits that do not set one: what a device below its rates saves up,
/// and may then spend at any speed.
pub const DEFAULT_BURST: Duration = Duration::from_millis(100);

/// Longest burst allowance.
pub const MAX_BURST: Duration = Duration::from_secs(60);

/// Rate limits; a rate of 0 is no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rates {
    /// Operations per second: of reads and writes together, of reads, of writes. Reads are
    /// READ requests; writes are WRITE, DISCARD and WRITE_ZEROES. FLUSH and GET_ID are not
    /// limited.
    pub iops: [u64; 3],
    /// Bytes per second, in the same order: the data of READ and WRITE requests.
    pub bps: [u64; 3],
    /// How much of its rates a device below them saves up: each limit admits up to this much
    /// of its rate at once.
    pub burst: Duration,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            iops: [0; 3],
            bps: [0; 3],
            burst: DEFAULT_BURST,
        }
    }
}

/// The names of the rates, in the order of [`Rates::iops`] then [`Rates::bps`]: the keys of
/// `--device`, `--qos-group` and the control socket.
pub const RATE_KEYS: [&str; 6] = [
    "iops-total",
    "iops-read",
    "iops-write",
    "bps-total",
    "bps-read",
    "bps-write",
];

/// The key of [`Rates::burst`], in milliseconds.
pub const BURST_KEY: &str = "qos-burst-ms";

impl Rates {
    /// Whether no rate is limited.
    pub fn unlimited(&self) -> bool {
        self.iops.iter().chain(&self.bps).all(|&r| r == 0)
    }

    /// The rate named `key` (one of [`RATE_KEYS`]).
    pub fn rate_mut(&mut self, key: &str) -> Option<&mut u64> {
        let i = RATE_KEYS.iter().position(|&k| k == key)?;
        Some(if i < 3 {
            &mut self.iops[i]
        } else {
            &mut self.bps[i - 3]
        })
    }

    /// Every rate with its key, in [`RATE_KEYS`]' order.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        RATE_KEYS
            .into_iter()
            .zip(self.iops.iter().chain(&self.bps).copied())
    }

    /// One fresh bucket per limited rate, with its whole burst.
    pub(super) fn buckets(&self, clock: &Clock) -> Vec<std::sync::Arc<Bucket>> {
        const WHICH: [(bool, bool); 3] = [(true, true), (true, false), (false, true)];
        self.named()
            .enumerate()
            .filter(|&(_, (_, rate))| rate > 0)
            .map(|(i, (_, rate))| {
                let (reads, writes) = WHICH[i % 3];
                let kind = Kind {
                    bytes: i >= 3,
                    reads,
                    writes,
                };
                std::sync::Arc::new(Bucket::new(kind, rate, self.burst, clock))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_rates_in_order() {
        let mut r = Rates::default();
        assert!(r.unlimited());
        *r.rate_mut("iops-write").unwrap() = 7;
        *r.rate_mut("bps-total").unwrap() = 9;
        assert!(r.rate_mut("iops").is_none());
        assert_eq!(r.iops, [0, 0, 7]);
        assert_eq!(r.bps, [9, 0, 0]);
        assert!(!r.unlimited());
        let named: Vec<_> = r.named().filter(|&(_, v)| v > 0).collect();
        assert_eq!(named, [("iops-write", 7), ("bps-total", 9)]);
        assert_eq!(r.buckets(&Clock::monotonic()).len(), 2);
    }
}
