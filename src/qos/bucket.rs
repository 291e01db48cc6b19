//! One rate limit, kept as a generic cell rate algorithm (GCRA, ITU-T I.371) would: not a
//! count of tokens refilled by a timer, but one number, the theoretical arrival time (TAT),
//! the moment at which what was charged so far would have passed at exactly the limited
//! rate. While TAT is ahead of now the bucket is in debt; up to `tolerance` of debt is the
//! burst allowance, and past it the bucket grants nothing until enough time has passed.
//!
//! Pollers do not charge it request by request: each takes a lease of [`Bucket::chunk`] units
//! (a millisecond of the rate) at a time, charged in advance, and spends it locally
//! ([`super::Lease`]). TAT is one atomic word, so pollers share a bucket (a device's queues on
//! several pollers, a group's devices) without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;

/// How much of its rate a limit grants at a time: a device held back goes on in steps of
/// this (at most its burst allowance), so that its guest takes one interrupt per step rather
/// than one per request.
pub const STEP: Duration = Duration::from_millis(1);

/// What a bucket limits: operations or bytes, of reads, writes or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// Bytes (else operations).
    pub bytes: bool,
    pub reads: bool,
    pub writes: bool,
}

/// One limit, shared by the pollers that take leases of it.
#[derive(Debug)]
pub struct Bucket {
    pub(super) kind: Kind,
    /// The theoretical arrival time, in ticks of the pollers' [`Clock`].
    tat: AtomicU64,
    ticks_per_unit: f64,
    /// Most debt, in ticks, with which the bucket still grants: the burst allowance.
    tolerance: u64,
    /// Units of one lease: [`STEP`] of the rate, at most the burst allowance, at least one.
    pub(super) chunk: u64,
}

impl Bucket {
    /// A bucket of `per_second` units of `kind` (at least 1), of which up to `burst` worth
    /// may be spent at once; time in ticks of `clock`. It starts with its whole burst.
    pub fn new(kind: Kind, per_second: u64, burst: Duration, clock: &Clock) -> Self {
        let ticks_per_second = clock.ticks_per_second();
        let rate = per_second.max(1) as f64;
        let step = STEP.min(burst).as_secs_f64();
        Self {
            kind,
            tat: AtomicU64::new(0),
            ticks_per_unit: ticks_per_second / rate,
            tolerance: whole(burst.as_secs_f64() * ticks_per_second),
            chunk: whole(step * rate).max(1),
        }
    }

    /// A lease at `now`: charges the bucket for one chunk and the `owed` units spent beyond
    /// the last lease, and returns the chunk; or, when the bucket is in debt past its
    /// tolerance, the tick from which it grants again (nothing is charged).
    pub fn lease(&self, now: u64, owed: u64) -> Result<u64, u64> {
        let cost = whole((self.chunk + owed) as f64 * self.ticks_per_unit);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            if tat.saturating_sub(now) > self.tolerance {
                return Err(tat - self.tolerance);
            }
            let next = tat.max(now).saturating_add(cost);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(self.chunk),
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

    #[test]
    fn a_fresh_bucket_grants_its_burst_then_its_rate_a_step_at_a_time() {
        // 10,000 operations a second, 5 ms of burst: leases of 10 operations (1 ms).
        let b = Bucket::new(OPS, 10_000, Duration::from_millis(5), &clock());
        assert_eq!(b.chunk, 10);
        let now = 5_000_000_000;
        // Six leases: the sixth takes the debt from 5 ms (the tolerance) to 6 ms.
        for _ in 0..6 {
            assert_eq!(b.lease(now, 0), Ok(10));
        }
        // Back when the debt is down to the tolerance again, 1 ms later.
        assert_eq!(b.lease(now, 0), Err(now + 1_000_000));
        assert_eq!(b.lease(now + 999_999, 0), Err(now + 1_000_000));
        assert_eq!(b.lease(now + 1_000_000, 0), Ok(10));
        // Three operations spent past a lease are paid with the next: 1.3 ms more.
        assert_eq!(b.lease(now + 2_000_000, 3), Ok(10));
        assert_eq!(b.lease(now + 2_000_000, 0), Err(now + 3_300_000));
    }

    #[test]
    fn an_idle_bucket_saves_no_more_than_its_burst() {
        let b = Bucket::new(OPS, 1000, Duration::from_millis(10), &clock());
        assert_eq!(b.chunk, 1);
        b.lease(1_000_000, 0).unwrap();
        let later = 1_000_000_000_000;
        let granted = (0..100).take_while(|_| b.lease(later, 0).is_ok()).count();
        assert_eq!(granted, 11, "10 ms of burst, and the lease that crosses it");
    }

    #[test]
    fn a_small_burst_makes_small_steps() {
        // 1 MiB/s with 100 µs of burst: leases of 104 bytes, not a millisecond's 1,048.
        let kind = Kind {
            bytes: true,
            reads: true,
            writes: false,
        };
        let b = Bucket::new(kind, 1 << 20, Duration::from_micros(100), &clock());
        assert_eq!(b.chunk, 104);
        // A rate below one unit a step still leases one.
        assert_eq!(
            Bucket::new(OPS, 1, Duration::from_secs(1), &clock()).chunk,
            1
        );
    }

    #[test]
    fn leases_taken_as_fast_as_granted_for_a_second_come_to_the_rate() {
        let rate = 50_000;
        let b = Bucket::new(OPS, rate, Duration::from_millis(1), &clock());
        let (mut now, mut taken) = (1_000_000_000u64, 0u64);
        let end = now + 1_000_000_000;
        while now < end {
            match b.lease(now, 0) {
                Ok(n) => taken += n,
                Err(at) => now = at,
            }
        }
        let burst = rate / 1000;
        assert!(
            taken.abs_diff(rate + burst) <= b.chunk,
            "took {taken} in a second"
        );
    }

    #[test]
    fn pollers_leasing_one_bucket_at_once_lose_no_charge() {
        let b = std::sync::Arc::new(Bucket::new(
            OPS,
            1_000_000_000,
            Duration::from_secs(60),
            &clock(),
        ));
        assert_eq!(b.chunk, 1_000_000);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        b.lease(0, 0).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // 4,000 leases of a million operations at one a nanosecond.
        assert_eq!(b.tat.load(Ordering::Relaxed), 4_000_000_000);
    }
}
