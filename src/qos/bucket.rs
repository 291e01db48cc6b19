//! One rate limit, kept as a generic cell rate algorithm (GCRA, ITU-T I.371) would: not a
//! count of tokens refilled by a timer, but one number, the theoretical arrival time (TAT),
//! the moment at which what was charged so far would have passed at exactly the limited
//! rate. While TAT is ahead of now the bucket is in debt; up to `tolerance` of debt is the
//! burst allowance, and past it the bucket admits nothing until enough time has passed.
//!
//! TAT is one atomic word, so pollers share a bucket (a device's queues on several pollers, a
//! group's devices) without a lock: a pass reads it once before it takes requests and adds
//! what it took once after.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;

/// What a pass took, in the units of every kind of bucket: operations read and written, bytes
/// read and written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally([u64; 4]);

impl Tally {
    /// Counts one request: a read (`write` false) or a write (a discard or write-zeroes is a
    /// write without bytes), of `bytes` bytes.
    #[inline(always)]
    pub fn count(&mut self, write: bool, bytes: u32) {
        let w = usize::from(write);
        self.0[w] += 1;
        self.0[2 + w] += u64::from(bytes);
    }
}

/// What a bucket limits: operations or bytes, of reads, writes or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// Bytes (else operations).
    pub bytes: bool,
    pub reads: bool,
    pub writes: bool,
}

impl Kind {
    /// The units of this kind in `t`.
    #[inline(always)]
    fn units(self, t: &Tally) -> u64 {
        let base = if self.bytes { 2 } else { 0 };
        t.0[base] * u64::from(self.reads) + t.0[base + 1] * u64::from(self.writes)
    }
}

/// One limit, shared by the pollers that charge it.
#[derive(Debug)]
pub struct Bucket {
    kind: Kind,
    /// The theoretical arrival time, in ticks of the pollers' [`Clock`].
    tat: AtomicU64,
    ticks_per_unit: f64,
    units_per_tick: f64,
    /// Most debt, in ticks, with which the bucket still admits: the burst allowance.
    tolerance: u64,
}

impl Bucket {
    /// A bucket of `per_second` units of `kind` (at least 1), of which up to `burst` worth
    /// may be spent at once; time in ticks of `clock`. It starts with its whole burst.
    pub fn new(kind: Kind, per_second: u64, burst: Duration, clock: &Clock) -> Self {
        let ticks_per_second = clock.ticks_per_second();
        let per_second = per_second.max(1) as f64;
        Self {
            kind,
            tat: AtomicU64::new(0),
            ticks_per_unit: ticks_per_second / per_second,
            units_per_tick: per_second / ticks_per_second,
            tolerance: whole(burst.as_secs_f64() * ticks_per_second),
        }
    }

    /// How many more units fit within the bucket's tolerance at `now` (a pass still takes one
    /// request when none fits, and the request that reaches the number is its last: see
    /// [`super::Gate`]), or, when it is past its tolerance already, the tick from which it
    /// admits again.
    #[inline(always)]
    pub fn allowance(&self, now: u64) -> Result<u64, u64> {
        let tat = self.tat.load(Ordering::Relaxed);
        let debt = tat.saturating_sub(now);
        if debt > self.tolerance {
            return Err(tat - self.tolerance);
        }
        Ok(whole((self.tolerance - debt) as f64 * self.units_per_tick))
    }

    /// Units of this bucket's kind in `t`.
    #[inline(always)]
    pub fn units(&self, t: &Tally) -> u64 {
        self.kind.units(t)
    }

    /// Charges what `t` took at `now`: TAT moves on by its time at the limited rate, from now
    /// if the bucket had paid off its debt (an idle bucket does not save more than its
    /// tolerance).
    #[inline]
    pub fn charge(&self, t: &Tally, now: u64) {
        let units = self.kind.units(t);
        if units == 0 {
            return;
        }
        let cost = whole(units as f64 * self.ticks_per_unit);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => tat = seen,
            }
        }
    }
}

/// `x`, a product of non-negative numbers, rounded down (saturating past `u64::MAX`).
#[inline(always)]
#[allow(clippy::cast_sign_loss)] // Never negative; `as` saturates.
fn whole(x: f64) -> u64 {
    x as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock of nanoseconds: the numbers below read as time.
    fn clock() -> Clock {
        Clock::monotonic()
    }

    const OPS: Kind = Kind {
        bytes: false,
        reads: true,
        writes: true,
    };

    fn reads(n: u64, bytes: u32) -> Tally {
        let mut t = Tally::default();
        for _ in 0..n {
            t.count(false, bytes);
        }
        t
    }

    #[test]
    fn a_fresh_bucket_admits_its_burst_then_its_rate() {
        // 1000 operations a second, 10 ms of burst: 10 operations at once.
        let b = Bucket::new(OPS, 1000, Duration::from_millis(10), &clock());
        let now = 5_000_000_000;
        assert_eq!(b.allowance(now), Ok(10));
        b.charge(&reads(10, 0), now);
        // Exactly at the tolerance: still admits (the next request crosses it).
        assert_eq!(b.allowance(now), Ok(0));
        b.charge(&reads(1, 0), now);
        // One operation past it: back 1 ms later.
        assert_eq!(b.allowance(now), Err(now + 1_000_000));
        assert_eq!(b.allowance(now + 999_999), Err(now + 1_000_000));
        assert_eq!(b.allowance(now + 1_000_000), Ok(0));
        // 5 ms later, five more.
        assert_eq!(b.allowance(now + 6_000_000), Ok(5));
    }

    #[test]
    fn an_idle_bucket_saves_no_more_than_its_burst() {
        let b = Bucket::new(OPS, 1000, Duration::from_millis(10), &clock());
        b.charge(&reads(1, 0), 1_000_000);
        assert_eq!(b.allowance(1_000_000_000_000), Ok(10));
        b.charge(&reads(3, 0), 1_000_000_000_000);
        assert_eq!(b.allowance(1_000_000_000_000), Ok(7));
    }

    #[test]
    fn kinds_count_their_own_units() {
        let mut t = Tally::default();
        t.count(false, 4096);
        t.count(false, 512);
        t.count(true, 8192);
        t.count(true, 0); // a discard
        let kind = |bytes, reads, writes| Kind {
            bytes,
            reads,
            writes,
        };
        assert_eq!(kind(false, true, true).units(&t), 4);
        assert_eq!(kind(false, true, false).units(&t), 2);
        assert_eq!(kind(false, false, true).units(&t), 2);
        assert_eq!(kind(true, true, true).units(&t), 4096 + 512 + 8192);
        assert_eq!(kind(true, true, false).units(&t), 4608);
        assert_eq!(kind(true, false, true).units(&t), 8192);
        // A bucket of read bytes is not charged for writes.
        let b = Bucket::new(kind(true, true, false), 1 << 20, Duration::ZERO, &clock());
        let mut w = Tally::default();
        w.count(true, 1 << 20);
        b.charge(&w, 7);
        assert_eq!(b.allowance(7), Ok(0));
    }

    #[test]
    fn a_bucket_charged_at_its_rate_for_a_second_admitted_exactly_its_rate() {
        // 50,000 operations a second taken 32 at a time, each pass as soon as the bucket
        // admits: after a simulated second, the operations admitted beyond the burst are the
        // rate, to one pass.
        let rate = 50_000;
        let b = Bucket::new(OPS, rate, Duration::from_millis(1), &clock());
        let (mut now, mut taken) = (1_000_000_000u64, 0u64);
        let end = now + 1_000_000_000;
        while now < end {
            match b.allowance(now) {
                Ok(allow) => {
                    let n = allow.clamp(1, 32);
                    b.charge(&reads(n, 0), now);
                    taken += n;
                }
                Err(at) => now = at,
            }
        }
        let burst = rate / 1000;
        assert!(
            taken.abs_diff(rate + burst) <= 32,
            "took {taken} in a second"
        );
    }

    #[test]
    fn pollers_charging_one_bucket_at_once_lose_no_charge() {
        let b = std::sync::Arc::new(Bucket::new(OPS, 1_000_000_000, Duration::ZERO, &clock()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        b.charge(&reads(1, 0), 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // 40,000 operations at one a nanosecond.
        assert_eq!(b.tat.load(Ordering::Relaxed), 40_000);
    }
}
