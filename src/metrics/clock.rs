//! The clock of request latencies. A poller reads it once per batch, so it must cost a few
//! instructions: on x86-64, where the kernel keeps time with the CPU's time-stamp counter
//! (its clocksource is `tsc`, which it chooses only when the counter runs at a constant rate
//! and in step on every CPU), it is that counter, scaled to nanoseconds by a factor measured
//! once per process; elsewhere the monotonic clock (a vDSO call, about a hundred
//! instructions, and a system call under valgrind).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the kernel names the clocksource it keeps time with.
const CLOCKSOURCE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
/// How long the counter is compared with the monotonic clock.
const CALIBRATION: Duration = Duration::from_millis(10);
/// Readings of the pair (counter, monotonic clock) at each end of the calibration; the one
/// read in the shortest time is kept (a thread preempted between the two reads would skew it).
const TRIES: usize = 5;

/// Nanoseconds since some fixed moment, on a clock every poller of the process shares.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Nanoseconds per tick of the time-stamp counter, times 2^32; 0: the monotonic clock is
    /// read instead.
    tsc_scale: u64,
    epoch: Instant,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();

impl Clock {
    /// The process's clock: the first call measures the counter against the monotonic clock
    /// ([`CALIBRATION`]) when the kernel keeps time with it, and reads the clocksource file.
    pub fn get() -> Clock {
        *CLOCK.get_or_init(|| {
            let epoch = Instant::now();
            let tsc_scale = if kernel_uses_tsc() {
                tsc_scale(epoch).unwrap_or(0)
            } else {
                0
            };
            Clock { tsc_scale, epoch }
        })
    }

    /// Whether the time-stamp counter is read (else the monotonic clock).
    pub fn is_tsc(&self) -> bool {
        self.tsc_scale != 0
    }

    /// Nanoseconds since the clock's start.
    #[inline(always)]
    pub fn now_ns(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        if self.tsc_scale != 0 {
            return scale(rdtsc(), self.tsc_scale);
        }
        self.monotonic_ns()
    }

    fn monotonic_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// `ticks` in nanoseconds, for a scale of nanoseconds per tick times 2^32.
#[inline(always)]
fn scale(ticks: u64, tsc_scale: u64) -> u64 {
    ((u128::from(ticks) * u128::from(tsc_scale)) >> 32) as u64
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

/// Nanoseconds per counter tick times 2^32, measured over [`CALIBRATION`]; `None` when the
/// measurement makes no sense (a counter slower than 100 MHz or faster than 100 GHz).
#[cfg(target_arch = "x86_64")]
fn tsc_scale(epoch: Instant) -> Option<u64> {
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
    u64::try_from((ns << 32) / ticks).ok()
}

#[cfg(not(target_arch = "x86_64"))]
fn tsc_scale(_epoch: Instant) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_keeps_time_with_the_monotonic_clock() {
        let clock = Clock::get();
        let (a, start) = (clock.now_ns(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let (b, took) = (clock.now_ns(), start.elapsed());
        let took = took.as_nanos() as f64;
        let measured = (b - a) as f64;
        // Within 2 % (the reads of the two clocks are not at the same instant, and the
        // calibration ran over 10 ms only).
        assert!(
            (measured - took).abs() < took * 0.02,
            "clock (tsc: {}) measured {measured} ns where {took} ns passed",
            clock.is_tsc()
        );
        assert!(clock.now_ns() >= b, "monotonic");
    }

    #[test]
    fn ticks_scale_to_nanoseconds() {
        // A 2.5 GHz counter: 0.4 ns per tick.
        let s = (2u64 << 32) / 5;
        assert_eq!(scale(2_500_000_000, s), 999_999_999);
        // Far beyond u64 before the shift: a counter of 2^60 ticks.
        assert_eq!(scale(1 << 60, 1 << 32), 1 << 60);
    }
}
