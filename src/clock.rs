//! The clock of request latencies. A poller reads it once per batch and converts each
//! request's latency, so both must cost a few instructions: on x86-64, where the kernel keeps
//! time with the CPU's time-stamp counter (its clocksource is `tsc`, which it chooses only when
//! the counter runs at a constant rate and in step on every CPU), a tick is one of that
//! counter's, converted by a multiplication with factors measured once per process; elsewhere
//! a tick is a nanosecond of the monotonic clock (a vDSO call, about a hundred instructions,
//! and a system call under valgrind).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the kernel names the clocksource it keeps time with.
const CLOCKSOURCE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
/// How long the counter is compared with the monotonic clock.
const CALIBRATION: Duration = Duration::from_millis(10);
/// Readings of the pair (counter, monotonic clock) at each end of the calibration; the one
/// read in the shortest time is kept (a thread preempted between the two reads would skew it).
const TRIES: usize = 5;

/// The clock pollers time requests with, in ticks: of the time-stamp counter, or nanoseconds
/// of the monotonic clock. Every poller of the process shares it.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Ticks are the time-stamp counter's (else nanoseconds of the monotonic clock).
    tsc: bool,
    /// Nanoseconds per tick, times 2^32.
    ns_scale: u64,
    /// Quarter microseconds per tick, times 2^64 (rounded down): what the latency
    /// histogram's buckets count in.
    quarter_scale: u64,
    epoch: Instant,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();

/// Nanoseconds in the histogram's unit, a quarter microsecond.
const QUARTER_US_NS: u64 = 250;

impl Clock {
    /// The process's clock: the first call reads the clocksource file and, when the kernel
    /// keeps time with the counter, measures it against the monotonic clock for 10 ms.
    pub fn get() -> Clock {
        *CLOCK.get_or_init(|| {
            let mono = Clock::monotonic();
            match kernel_uses_tsc().then(|| tsc_scales(mono.epoch)).flatten() {
                Some((ns_scale, quarter_scale)) => Clock {
                    tsc: true,
                    ns_scale,
                    quarter_scale,
                    epoch: mono.epoch,
                },
                None => mono,
            }
        })
    }

    /// A clock whose ticks are nanoseconds of the monotonic clock.
    pub fn monotonic() -> Clock {
        Clock {
            tsc: false,
            ns_scale: 1 << 32,
            quarter_scale: u64::MAX / QUARTER_US_NS,
            epoch: Instant::now(),
        }
    }

    /// Ticks since some fixed moment.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        if self.tsc {
            return rdtsc();
        }
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Ticks in a second.
    pub fn ticks_per_second(&self) -> f64 {
        1e9 * (1u64 << 32) as f64 / self.ns_scale as f64
    }

    /// `ticks` in nanoseconds.
    pub fn nanos(&self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.ns_scale)) >> 32) as u64
    }

    /// `ticks` in whole quarter microseconds, rounded down (so that a latency equal to a
    /// bucket's bound, to the clock's precision, counts in that bucket): the high half of one
    /// multiplication.
    #[inline(always)]
    pub fn quarter_us(&self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.quarter_scale)) >> 64) as u64
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rdtsc() -> u64 {
    // SAFETY: RDTSC is part of every x86-64 CPU; it reads the time-stamp counter and touches
    // no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Whether the kernel keeps time with the time-stamp counter.
fn kernel_uses_tsc() -> bool {
    cfg!(target_arch = "x86_64")
        && std::fs::read_to_string(CLOCKSOURCE).is_ok_and(|s| s.trim() == "tsc")
}

/// Nanoseconds per counter tick times 2^32, and quarter microseconds per tick times 2^64,
/// measured over [`CALIBRATION`]; `None` when the measurement makes no sense (a counter
/// slower than 100 MHz or faster than 100 GHz).
#[cfg(target_arch = "x86_64")]
fn tsc_scales(epoch: Instant) -> Option<(u64, u64)> {
    let pair = || {
        (0..TRIES)
            .map(|_| {
                let before = rdtsc();
                let ns = epoch.elapsed().as_nanos();
                let after = rdtsc();
                (after.wrapping_sub(before), before / 2 + after / 2, ns)
            })
            .min_by_key(|&(spread, ..)| spread)
            .map(|(_, ticks, ns)| (ticks, ns))
    };
    let (t0, n0) = pair()?;
    std::thread::sleep(CALIBRATION);
    let (t1, n1) = pair()?;
    let ticks = u128::from(t1.checked_sub(t0)?);
    let ns = n1.checked_sub(n0)?;
    // Nanoseconds per tick between 0.01 and 10.
    if ticks == 0 || ns * 100 < ticks || ns > ticks * 10 {
        return None;
    }
    let ns_scale = u64::try_from((ns << 32) / ticks).ok()?;
    let quarter_scale = u64::try_from((ns << 64) / (ticks * u128::from(QUARTER_US_NS))).ok()?;
    Some((ns_scale, quarter_scale))
}

#[cfg(not(target_arch = "x86_64"))]
fn tsc_scales(_epoch: Instant) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_keeps_time_with_the_monotonic_clock() {
        let clock = Clock::get();
        let (a, start) = (clock.now(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let (b, took) = (clock.now(), start.elapsed());
        let took = took.as_nanos() as f64;
        let measured = clock.nanos(b - a) as f64;
        // Within 2 % (the reads of the two clocks are not at the same instant, and the
        // calibration ran over 10 ms only).
        assert!(
            (measured - took).abs() < took * 0.02,
            "clock (tsc: {}) measured {measured} ns where {took} ns passed",
            clock.tsc
        );
        let quarters = clock.quarter_us(b - a) as f64;
        assert!((quarters * 250.0 - measured).abs() < measured * 0.001 + 250.0);
        assert!(clock.now() >= b, "monotonic");
    }

    #[test]
    fn ticks_scale_to_nanoseconds_and_quarter_microseconds() {
        // A 2.5 GHz counter: 0.4 ns per tick.
        let c = Clock {
            tsc: true,
            ns_scale: (2u64 << 32) / 5,
            quarter_scale: u64::MAX / 625,
            epoch: Instant::now(),
        };
        assert_eq!(c.nanos(2_500_000_000), 999_999_999);
        assert!((c.ticks_per_second() - 2.5e9).abs() < 1.0);
        assert_eq!(c.quarter_us(2_500_000_000), 3_999_999);
        let m = Clock::monotonic();
        assert_eq!(m.nanos(12_345), 12_345);
        // Far beyond u64 before the shift.
        assert_eq!(m.nanos(1 << 60), 1 << 60);
        assert_eq!(m.quarter_us(134_217_728_001), 536_870_912);
        // A latency on a bound stays in the bucket below it; one past it does not.
        assert_eq!(m.quarter_us(999), 3);
        assert_eq!(m.quarter_us(1000), 3);
        assert_eq!(m.quarter_us(1001), 4);
        assert_eq!(m.quarter_us(1250), 4);
        assert_eq!(m.quarter_us(1251), 5);
    }
}
