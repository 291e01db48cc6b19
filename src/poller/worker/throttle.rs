//! Queues their devices' rate limits hold back ([`crate::qos`]): what a pass records when the
//! limits do not admit, and how the poller sleeps until they do. A held-back queue keeps its
//! chains in the avail ring and its kicks off (more kicks would not let it take more); the
//! poller's timer wakes it when the limits admit again, so that it neither spins nor misses
//! the moment.

use std::time::Duration;

use super::{MAX_THROTTLED_SLEEP, QueueSlot, Worker};
use crate::clock::Clock;
use crate::metrics::QueueMetrics;
use crate::qos::Lease;

/// A pass found a queue's device with a used-up lease of its rate limits: renews it at the
/// clock's now. Returns whether the pass may take requests; if not, the queue is held back
/// (since `since`, set now if it was not yet) until `resume_at` at the latest. Free functions
/// over the queue's fields: the pass holds the queue's vring lock through a borrow of it.
#[cold]
#[inline(never)]
pub(super) fn renew(
    lease: &mut Lease,
    since: &mut u64,
    clock: &Clock,
    resume_at: &mut u64,
) -> bool {
    let now = clock.now();
    match lease.renew(now) {
        Ok(()) => true,
        Err(at) => {
            if *since == 0 {
                *since = now.max(1);
            }
            *resume_at = (*resume_at).min(at);
            false
        }
    }
}

/// A pass takes requests again from a queue held back since `since`: the time goes to its
/// metrics.
#[cold]
#[inline(never)]
pub(super) fn unthrottle(since: &mut u64, metrics: Option<&QueueMetrics>, clock: &Clock) {
    if let Some(m) = metrics {
        m.throttled(clock.now().saturating_sub(*since));
    }
    *since = 0;
}

impl QueueSlot {
    /// Whether the last pass found the queue held back.
    pub(super) fn is_throttled(&self) -> bool {
        self.throttled_since != 0
    }
}

impl Worker {
    /// Before the poller sleeps, rate limits having held a queue back in the last pass: arms
    /// its timer for the moment they let the first such queue go on (at most
    /// [`MAX_THROTTLED_SLEEP`] away), and returns the longest sleep in milliseconds (a
    /// backstop should the timer fail), or `None` when that moment has come already.
    pub(super) fn arm_throttle_timer(&mut self) -> Option<i32> {
        let now = self.clock.now();
        if self.resume_at <= now {
            return None;
        }
        let wait = Duration::from_nanos(self.clock.nanos(self.resume_at - now))
            .clamp(Duration::from_micros(1), MAX_THROTTLED_SLEEP);
        if let Err(e) = self.timer.reset(wait, None) {
            tracing::error!(error = %e, "cannot arm the poller's timer");
        }
        Some(MAX_THROTTLED_SLEEP.as_millis() as i32 + 1)
    }

    /// After the poller woke from a sleep its timer was armed for: disarms it, which also
    /// clears an expiry it did not read (else the next sleep would end at once).
    pub(super) fn disarm_throttle_timer(&mut self) {
        if let Err(e) = self.timer.clear() {
            tracing::error!(error = %e, "cannot disarm the poller's timer");
        }
    }
}
