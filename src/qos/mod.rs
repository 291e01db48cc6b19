//! Quality of service: per-device limits on operations and bytes per second, with a burst
//! allowance, and groups of devices that share limits ([`Groups`]).
//!
//! Each limit is a [`Bucket`] kept as GCRA does, one atomic word per limit, shared by every
//! poller that serves the device. A poller opens a [`Gate`] on a queue's [`Plan`] once per
//! pass (one load per limit): a device past a limit's tolerance keeps its requests in the
//! avail ring, and the gate says when it may take them; otherwise the gate counts what the
//! pass takes (two additions per request, one comparison per limit) and stops the pass at
//! the request that spends the allowance, and the pass charges what it took once, at its end.
//! Nothing per request locks, allocates or calls the kernel.
//!
//! A device's plan changes at runtime (`device_set_qos`, a group's new rates): the control
//! plane builds a new one and bumps the device's generation, which each pass compares with
//! one load; only a poller that sees it change takes the device's lock for the new plan.
//! A leaf module beside `clock`.

mod bucket;
mod groups;
mod rates;

pub use bucket::Tally;
pub use groups::{GroupInfo, Groups, QosError};
pub use rates::{BURST_KEY, DEFAULT_BURST, MAX_BURST, RATE_KEYS, Rates};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bucket::Bucket;

/// Most limits one device can be under: its own six and its group's six.
pub const MAX_LIMITS: usize = 12;

/// The limits a device's requests are charged to: its own, then its group's. Immutable: a
/// change of limits is a new plan.
#[derive(Debug)]
pub struct Plan {
    buckets: Vec<Arc<Bucket>>,
}

impl Plan {
    /// Opens a pass at `now`: the gate that admits its requests, or, when a limit is past its
    /// tolerance, the tick at which the device may take requests again.
    #[inline(always)]
    pub fn open(&self, now: u64) -> Result<Gate<'_>, u64> {
        let mut allow = [0; MAX_LIMITS];
        for (a, b) in allow.iter_mut().zip(&self.buckets) {
            *a = b.allowance(now)?;
        }
        Ok(Gate {
            buckets: &self.buckets,
            allow,
            tally: Tally::default(),
        })
    }
}

/// One pass's admission of one queue's requests.
#[derive(Debug)]
pub struct Gate<'a> {
    buckets: &'a [Arc<Bucket>],
    /// Units of each limit that fit within its tolerance when the pass opened.
    allow: [u64; MAX_LIMITS],
    tally: Tally,
}

impl Gate<'_> {
    /// Counts a request the pass took: a read or a write (DISCARD and WRITE_ZEROES are writes
    /// of no bytes) of `bytes`. Returns whether the pass must stop taking requests: a limit's
    /// allowance is spent. The first request of a pass is taken whatever its size; a limit
    /// then in debt past its tolerance holds the next pass back.
    #[inline(always)]
    pub fn take(&mut self, write: bool, bytes: u32) -> bool {
        self.tally.count(write, bytes);
        self.buckets
            .iter()
            .zip(&self.allow)
            .any(|(b, &allow)| b.units(&self.tally) >= allow)
    }

    /// Charges what the pass took, at `now` (the pass's time).
    #[inline]
    pub fn close(self, now: u64) {
        if self.tally == Tally::default() {
            return;
        }
        for b in self.buckets {
            b.charge(&self.tally, now);
        }
    }
}

/// A device's limits, as its queues' pollers and the control plane share them. It belongs to
/// the device, not to a frontend's session: limits and debt survive reconnections.
#[derive(Debug, Default)]
pub struct DeviceQos {
    /// Bumped after each change of `state.plan`.
    generation: AtomicU64,
    state: Mutex<DeviceState>,
}

#[derive(Debug, Default)]
struct DeviceState {
    /// The device's own limits, and their buckets.
    rates: Rates,
    own: Vec<Arc<Bucket>>,
    /// The group it shares limits with, and that group's buckets.
    group: Option<String>,
    shared: Vec<Arc<Bucket>>,
    /// `own` then `shared`, or `None` when both are empty.
    plan: Option<Arc<Plan>>,
}

impl DeviceState {
    fn rebuild(&mut self) {
        let buckets: Vec<_> = self.own.iter().chain(&self.shared).cloned().collect();
        self.plan = (!buckets.is_empty()).then(|| Arc::new(Plan { buckets }));
    }
}

impl DeviceQos {
    /// The generation of the device's plan: a poller compares it with the one of the plan it
    /// holds, once per pass.
    #[inline(always)]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The device's plan (`None`: no limit) and its generation.
    pub fn plan(&self) -> (u64, Option<Arc<Plan>>) {
        let state = self.lock();
        (self.generation(), state.plan.clone())
    }

    /// The device's own limits and the group it is in.
    pub fn settings(&self) -> (Rates, Option<String>) {
        let state = self.lock();
        (state.rates, state.group.clone())
    }

    fn lock(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state under its lock, rebuilds the plan and publishes it.
    fn change(&self, f: impl FnOnce(&mut DeviceState)) {
        let mut state = self.lock();
        f(&mut state);
        state.rebuild();
        self.generation.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::Clock;

    fn plan(rates: Rates) -> Plan {
        Plan {
            buckets: rates.buckets(&Clock::monotonic()),
        }
    }

    #[test]
    fn a_gate_stops_the_pass_at_the_request_that_spends_the_allowance() {
        // 1000 reads a second and 1 MiB/s in total, 10 ms of burst: 10 reads, 10,485 bytes.
        let p = plan(Rates {
            iops: [0, 1000, 0],
            bps: [1 << 20, 0, 0],
            burst: Duration::from_millis(10),
        });
        let now = 1_000_000_000;
        let mut g = p.open(now).unwrap();
        // Writes do not count against the read limit; their bytes count in the total.
        assert!(!g.take(true, 4096));
        assert!(!g.take(false, 4096));
        assert!(g.take(false, 4096), "12,288 bytes reach 10,485");
        g.close(now);
        // 12,288 bytes at 1 MiB/s is 11.7 ms of debt, past 10 ms: back 1.7 ms later.
        let back = p.open(now).unwrap_err();
        assert_eq!(back, now + 11_718_750 - 10_000_000);
        let mut g = p.open(back).unwrap();
        // Nothing fits, yet one request is taken.
        assert!(g.take(false, 512));
    }

    #[test]
    fn an_unlimited_direction_is_never_held() {
        let p = plan(Rates {
            iops: [0, 0, 100],
            burst: Duration::from_millis(10),
            ..Rates::default()
        });
        let mut g = p.open(0).unwrap();
        for _ in 0..10_000 {
            assert!(!g.take(false, 1 << 20));
        }
        g.close(0);
        assert!(p.open(0).is_ok());
    }

    #[test]
    fn a_pass_that_took_nothing_charges_nothing() {
        let p = plan(Rates {
            iops: [1, 0, 0],
            burst: Duration::ZERO,
            ..Rates::default()
        });
        p.open(5).unwrap().close(5);
        let mut g = p.open(5).unwrap();
        assert!(g.take(true, 0));
        g.close(5);
        assert_eq!(p.open(5).unwrap_err(), 1_000_000_005);
    }
}
