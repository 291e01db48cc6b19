//! Warming a queue's lines while its poller waits for the next request.
//!
//! A request at QD 1 reaches the poller as a chain of dependent cache misses: the avail index,
//! then the avail entry, the descriptor it names, the header and status the descriptor points
//! at, each written by the frontend on another CPU just before. A frontend tends to reuse the
//! same descriptors and request buffers for its next request (a free list), so while a poller
//! spins on a queue that just had one, it prefetches the next avail entry and the lines of the
//! last request's descriptor and status: when the next request comes, those loads overlap with
//! the avail index's instead of following it one by one.
//!
//! Only for a few passes after the queue's last request (about a microsecond here): a polling
//! client's next request comes within them, a sleeping client's does not. Measured against
//! the same build without it, A/B on the benchmark machine (`benches/compare.sh`'s setup,
//! null device): +10–15 % QD 1 IOPS with a poll client, +2–3 % at QD 32, no change with an
//! eventfd client. Prefetching for 64 passes instead slowed the eventfd client's QD 1 by 7 %,
//! and prefetching as long as the queue stayed idle by a third: the poller then keeps taking
//! back lines that the frontend, waking up, is about to write.

/// Empty passes after a queue's last request during which its lines are prefetched.
const WARM_PASSES: u32 = 24;

/// The lines of one queue worth keeping warm.
#[derive(Debug, Default)]
pub(super) struct Warm {
    /// Host addresses of the last request's descriptor and status byte (null: none).
    lines: [usize; 2],
    /// Empty passes since the queue's last request.
    idle: u32,
}

impl Warm {
    /// The queue had requests; the last one's descriptor and status byte are at these host
    /// addresses (if they could be translated).
    pub(super) fn worked(&mut self, desc: Option<*mut u8>, status: Option<*mut u8>) {
        self.lines = [desc, status].map(|p| p.map_or(0, |p| p as usize));
        self.idle = 0;
    }

    /// The queue had nothing new this pass; `avail_entry` is where its next request's avail
    /// entry will be written. Returns whether it prefetched.
    #[inline]
    pub(super) fn idle_pass(&mut self, avail_entry: *const u8) -> bool {
        if self.idle >= WARM_PASSES {
            return false;
        }
        self.idle += 1;
        self.warm_lines(avail_entry);
        true
    }

    /// The prefetches of one warm pass. Not inlined, so that a profile tells them apart from
    /// the work of serving requests (`benches/callgrind.sh` counts them with the empty polls).
    #[inline(never)]
    fn warm_lines(&self, avail_entry: *const u8) {
        prefetch(avail_entry);
        for &line in &self.lines {
            if line != 0 {
                prefetch(line as *const u8);
            }
        }
    }
}

/// Asks for the cache line holding `p` (a hint: never faults, changes nothing).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache; it never faults, whatever the address, and
    // accesses no memory the program can observe. SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_warmed_for_a_bounded_number_of_idle_passes_after_each_request() {
        let mut w = Warm::default();
        let line = [0u8; 64];
        let at = line.as_ptr();
        // Nothing is known yet: only the next avail entry is warmed, and not forever.
        assert_eq!(
            (0..100).filter(|_| w.idle_pass(at)).count(),
            WARM_PASSES as usize
        );
        w.worked(Some(line.as_ptr().cast_mut()), None);
        assert_eq!(w.lines, [at as usize, 0]);
        assert_eq!(
            (0..100).filter(|_| w.idle_pass(at)).count(),
            WARM_PASSES as usize
        );
        // Each request starts the count again.
        w.worked(None, Some(line.as_ptr().cast_mut()));
        assert_eq!(w.lines, [0, at as usize]);
        assert!(w.idle_pass(at));
    }
}
