//! Devices their rate limits hold back ([`crate::qos`]): what a pass records when a limit
//! grants nothing, and how the poller sleeps until it does. A held-back device keeps its chains
//! in the avail ring and its queues' kicks off (more kicks would not let it take more); the
//! poller's timer wakes it when the limit grants again, so that it neither spins nor misses
//! the moment. The state is the device's, as its lease is: every queue of the device on this
//! poller waits for the same limit.

use std::time::Duration;

use super::{MAX_THROTTLED_SLEEP, Worker};
use crate::clock::Clock;
use crate::metrics::QueueMetrics;
use crate::qos::Lease;

/// Whether, and until when, a device's limits hold it back on this poller.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Held {
    /// When a pass first found the device held back (a tick of the pollers' clock); 0: it is
    /// not.
    since: u64,
    /// The tick from which the limit that held it back grants again.
    until: u64,
}

impl Held {
    /// Whether the device is held back at `now`: past `until`, its next pass renews its lease
    /// (and holds it back again if the limit still grants nothing), so its kicks go back on.
    fn at(&self, now: u64) -> bool {
        self.since != 0 && self.until > now
    }
}

/// A pass found a device's lease of its limits used up: renews it at the clock's now. Returns
/// whether the pass may take requests. When it may not, the device is held back until the
/// tick the limit names (and `maybe_held` tells the poller's sleep to look); when it may after
/// being held back, the time goes to the metrics of the queue whose pass this is.
#[cold]
#[inline(never)]
pub(super) fn renew(
    lease: &mut Lease,
    held: &mut Held,
    metrics: Option<&QueueMetrics>,
    clock: &Clock,
    maybe_held: &mut bool,
) -> bool {
    let now = clock.now();
    match lease.renew(now) {
        Ok(()) => {
            if held.since != 0 {
                if let Some(m) = metrics {
                    m.throttled(now.saturating_sub(held.since));
                }
                *held = Held::default();
            }
            true
        }
        Err(until) => {
            if held.since == 0 {
                held.since = now.max(1);
            }
            held.until = until;
            *maybe_held = true;
            false
        }
    }
}

impl Worker {
    /// Before the poller sleeps: the earliest tick at which a device held back now may go on,
    /// if any is (forgetting that any may be once none is). Inlined: with no device ever held
    /// back, one test.
    #[inline(always)]
    pub(super) fn held_until(&mut self) -> Option<u64> {
        if self.maybe_held {
            self.find_held()
        } else {
            None
        }
    }

    #[cold]
    #[inline(never)]
    fn find_held(&mut self) -> Option<u64> {
        let now = self.clock.now();
        let mut any = false;
        let mut until = None::<u64>;
        for d in self.devices.iter().flatten() {
            any |= d.held.since != 0;
            if d.held.at(now) {
                until = Some(until.map_or(d.held.until, |u| u.min(d.held.until)));
            }
        }
        self.maybe_held = any;
        until
    }

    /// Whether queue `qi`'s device is held back at `now`: its kicks stay off.
    pub(super) fn queue_held(&self, qi: usize, now: u64) -> bool {
        self.queues[qi]
            .as_ref()
            .and_then(|q| self.devices[q.device].as_ref())
            .is_some_and(|d| d.held.at(now))
    }

    /// Arms the poller's timer for tick `until` (at most [`MAX_THROTTLED_SLEEP`] away) and
    /// returns the longest sleep in milliseconds, a backstop should the timer fail.
    pub(super) fn arm_throttle_timer(&mut self, until: u64) -> i32 {
        let now = self.clock.now();
        let wait = Duration::from_nanos(self.clock.nanos(until.saturating_sub(now)))
            .clamp(Duration::from_micros(1), MAX_THROTTLED_SLEEP);
        if let Err(e) = self.timer.reset(wait, None) {
            tracing::error!(error = %e, "cannot arm the poller's timer");
        }
        MAX_THROTTLED_SLEEP.as_millis() as i32 + 1
    }

    /// After the poller woke from a sleep its timer was armed for: disarms it, which also
    /// clears an expiry it did not read (else the next sleep would end at once).
    pub(super) fn disarm_throttle_timer(&mut self) {
        if let Err(e) = self.timer.clear() {
            tracing::error!(error = %e, "cannot disarm the poller's timer");
        }
    }
}
