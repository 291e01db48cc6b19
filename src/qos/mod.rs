//! Quality of service: per-device limits on operations and bytes per second, with a burst
//! allowance, and groups of devices that share limits ([`Groups`]).
//!
//! Each limit is a [`Bucket`] kept as GCRA does, one atomic word per limit, shared by every
//! poller that serves the device. A poller does not consult it per request or per pass: it
//! holds a [`Lease`] of each of the device's limits, a millisecond of the rate charged to the
//! bucket in advance, and spends it as it takes requests (per limit, what the request's class
//! costs, from a table: a subtraction and a comparison). A pass that finds a lease used up
//! renews it first; a bucket in debt past its burst allowance grants nothing, and the device
//! keeps its requests in the avail ring until the tick the bucket names. Nothing per request
//! locks, allocates, calls the kernel or touches a shared cache line.
//!
//! A device's plan changes at runtime (`device_set_qos`, a group's new rates): the control
//! plane builds a new one and bumps the device's generation, which each pass compares with
//! one load; only a poller that sees it change takes the device's lock for the new plan, and
//! its leases of the old one are dropped. A leaf module beside `clock`.

mod bucket;
mod groups;
mod rates;

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

/// What a request is to rate limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A read: an operation and its bytes.
    Read,
    /// A write: an operation and its bytes.
    Write,
    /// A write that moves no data (DISCARD, WRITE_ZEROES): an operation.
    Dataless,
    /// Not limited (FLUSH, GET_ID).
    Free,
}

/// How many [`Class`]es there are.
const CLASSES: usize = 4;

/// One poller's leases of a device's limits: what it may still take of each before it asks
/// the limit for more.
#[derive(Debug)]
pub struct Lease {
    plan: Arc<Plan>,
    /// One per limit of the plan, in its order; `shares[..n]` are in use.
    shares: [Share; MAX_LIMITS],
    n: usize,
    /// A lease is used up: the next pass renews before it takes a request.
    spent: bool,
}

/// The lease of one limit, and what a request of each [`Class`] costs it: a table rather than
/// tests, so that counting a request does not branch on what it is.
#[derive(Clone, Copy, Debug, Default)]
struct Share {
    /// Units left (below zero: spent beyond the lease, owed to the limit).
    left: i64,
    /// Operations a request of each class costs: 0 or 1.
    ops: [i64; CLASSES],
    /// Bytes of a request of each class the limit counts: all (`-1`, a mask) or none (0).
    bytes: [i64; CLASSES],
}

impl Lease {
    /// Whether this lease is of `plan`.
    pub fn is_of(&self, plan: &Arc<Plan>) -> bool {
        Arc::ptr_eq(&self.plan, plan)
    }

    /// No lease yet of `plan`'s limits: the first pass takes them.
    pub fn new(plan: Arc<Plan>) -> Self {
        let mut shares = [Share::default(); MAX_LIMITS];
        for (s, b) in shares.iter_mut().zip(&plan.buckets) {
            let k = b.kind;
            // By class: whether the limit counts it at all, and whether it moves bytes.
            let each = [
                (k.reads, true),
                (k.writes, true),
                (k.writes, false),
                (false, false),
            ];
            s.ops = each.map(|(counted, _)| i64::from(counted && !k.bytes));
            s.bytes = each.map(|(counted, data)| -i64::from(counted && data && k.bytes));
        }
        Self {
            n: plan.buckets.len(),
            plan,
            shares,
            spent: true,
        }
    }

    /// Whether a lease is used up: the pass must [`Lease::renew`] before it takes a request.
    #[inline(always)]
    pub fn spent(&self) -> bool {
        self.spent
    }

    /// Renews the used-up leases at `now` (paying what was spent beyond them); or, when a
    /// limit is in debt past its burst allowance, returns the tick from which it grants again
    /// (the leases renewed meanwhile are kept).
    #[cold]
    #[inline(never)]
    pub fn renew(&mut self, now: u64) -> Result<(), u64> {
        for (s, b) in self.shares.iter_mut().zip(&self.plan.buckets) {
            if s.left > 0 {
                continue;
            }
            let granted = b.lease(now, s.left.unsigned_abs())?;
            s.left = i64::try_from(granted).unwrap_or(i64::MAX);
        }
        self.spent = false;
        Ok(())
    }

    /// Counts a request a pass took, of class `class` and `bytes` of data. Returns whether a
    /// lease is now used up: the pass then ends its turn (the request that used it up is taken
    /// whatever its size).
    #[inline(always)]
    pub fn take(&mut self, class: Class, bytes: u32) -> bool {
        let (d, bytes) = (class as usize, i64::from(bytes));
        let spend = |s: &mut Share| {
            s.left -= s.ops[d] + (s.bytes[d] & bytes);
            s.left <= 0
        };
        // Most devices have one limit: without the loop, a request costs it half as much.
        let spent = if self.n == 1 {
            spend(&mut self.shares[0])
        } else {
            self.shares[..self.n]
                .iter_mut()
                .fold(false, |spent, s| spend(s) | spent)
        };
        self.spent = spent;
        spent
    }
}

/// A device's limits, as its queues' pollers and the control plane share them. It belongs to
/// the device, not to a frontend's session: limits and debt survive reconnections.
///
/// Its generation counts every change pollers must take of the device, not only of its plan:
/// the control plane also bumps it ([`DeviceQos::changed`]) after it replaced a session's
/// memory map or the device's capacity, so that a pass checks all of them with one load.
#[derive(Debug, Default)]
pub struct DeviceQos {
    /// Bumped after each change of `state.plan`, and by [`DeviceQos::changed`].
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
    /// The device's generation: a poller compares it with the one it last saw, once per
    /// pass.
    #[inline(always)]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Something else pollers keep of the device changed (its memory map, its capacity): the
    /// change is made before, and seen by every pass that reads the new generation.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The device's plan (`None`: no limit).
    pub fn plan(&self) -> Option<Arc<Plan>> {
        self.lock().plan.clone()
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

    fn plan(rates: Rates) -> Arc<Plan> {
        Arc::new(Plan {
            buckets: rates.buckets(&Clock::monotonic()),
        })
    }

    #[test]
    fn a_lease_is_spent_by_the_requests_of_its_kind() {
        // 1000 reads a second and 1 MiB/s in total: leases of one read and 1,048 bytes.
        let mut l = Lease::new(plan(Rates {
            iops: [0, 1000, 0],
            bps: [1 << 20, 0, 0],
            burst: Duration::from_millis(10),
        }));
        assert!(l.spent(), "nothing leased yet");
        l.renew(0).unwrap();
        assert!(!l.spent());
        // A write of 1,000 bytes: not a read; its bytes count in the total.
        assert!(!l.take(Class::Write, 1000));
        // A read uses up the read lease (and the bytes lease, 48 bytes past it).
        assert!(l.take(Class::Read, 96));
        assert_eq!((l.shares[0].left, l.shares[1].left), (0, -48));
        l.renew(0).unwrap();
        assert_eq!((l.shares[0].left, l.shares[1].left), (1, 1048));
    }

    #[test]
    fn flushes_are_free_and_discards_are_operations_without_bytes() {
        let mut l = Lease::new(plan(Rates {
            iops: [0, 0, 1000],
            bps: [1 << 20, 0, 0],
            burst: Duration::from_millis(10),
        }));
        l.renew(0).unwrap();
        let left = |l: &Lease| (l.shares[0].left, l.shares[1].left);
        assert_eq!(left(&l), (1, 1048));
        assert!(!l.take(Class::Free, 4096));
        assert_eq!(left(&l), (1, 1048), "a flush costs nothing");
        assert!(l.take(Class::Dataless, 4096));
        assert_eq!(
            left(&l),
            (0, 1048),
            "a discard's range descriptors are not data"
        );
    }

    #[test]
    fn an_unlimited_direction_never_spends_a_lease() {
        let mut l = Lease::new(plan(Rates {
            iops: [0, 0, 100],
            burst: Duration::from_millis(10),
            ..Rates::default()
        }));
        l.renew(0).unwrap();
        for _ in 0..10_000 {
            assert!(!l.take(Class::Read, 1 << 20));
        }
    }

    #[test]
    fn a_limit_past_its_burst_holds_the_device_back_until_it_grants_again() {
        // 1000 operations a second, no burst beyond one lease (1 ms).
        let mut l = Lease::new(plan(Rates {
            iops: [1000, 0, 0],
            burst: Duration::from_millis(1),
            ..Rates::default()
        }));
        l.renew(0).unwrap();
        assert!(l.take(Class::Dataless, 0));
        l.renew(0).unwrap();
        // Three more than leased: owed, and paid with the next lease.
        for _ in 0..4 {
            l.take(Class::Dataless, 0);
        }
        assert_eq!(l.shares[0].left, -3);
        assert_eq!(l.renew(0), Err(1_000_000));
        assert!(l.spent(), "still to renew");
        l.renew(1_000_000).unwrap();
        // 2 ms charged, 3 owed and 1 leased: 6 ms, granting again at 5.
        assert_eq!(l.renew(1_000_000), Ok(()), "nothing used up: nothing asked");
        l.take(Class::Dataless, 0);
        assert_eq!(l.renew(1_000_000), Err(5_000_000));
    }
}
