//! Per-device I/O metrics: requests, bytes, errors by kind, requests in flight and a latency
//! histogram, for every queue of a device, summed over its queues when read.
//!
//! Each queue a frontend has started has counters of its own ([`QueueMetrics`], a cache-line
//! aligned block, made when the queue first starts: a device offers more queues than most
//! frontends start), and only the poller that serves the queue writes them: a queue belongs to one poller at a time
//! (the control plane hands it over with messages, which order one poller's writes before
//! the next one's), so a counter is bumped with a plain load and store, no locked
//! read-modify-write, no lock, no allocation. Readers (the control socket, the metrics
//! endpoint) load the counters of every queue and add them up ([`DeviceMetrics::read`]); a
//! reading is not a snapshot of one instant, but every counter in it only grows.
//!
//! A device's metrics belong to the device, not to a frontend's session: they survive
//! reconnections and go when the device is removed. It uses only the leaf `clock`.

mod histogram;
pub mod json;
pub mod prometheus;

pub use histogram::{AtomicHistogram, BUCKETS, Histogram, bounds_ns, bucket, upper_bound_ns};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::clock::Clock;

/// Adds `n` to a counter that only the calling thread writes: a load and a store, which other
/// threads see whole (an atomic store) but which is not a locked instruction.
#[inline(always)]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// What a request asked of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// GET_ID.
    Other,
}

/// How many kinds of [`Op`] there are.
pub const OPS: usize = 6;

impl Op {
    /// Every kind, in the order of [`Counters::ops`].
    pub const ALL: [Op; OPS] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::Other,
    ];

    /// Its name in the metrics (`read_ops`, `vubd_device_read_ops_total`).
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::Other => "other",
        }
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The disk failed it (an I/O error, a short transfer, a channel that could not take it).
    Io,
    /// Refused with UNSUPP: a request type the device does not serve.
    Unsupported,
    /// Refused with IOERR before it reached the disk: malformed, beyond the capacity, a write
    /// to a read-only device.
    Invalid,
}

/// How many kinds of [`ErrorKind`] there are.
pub const ERROR_KINDS: usize = 3;

impl ErrorKind {
    /// Every kind, in the order of [`Counters::errors`].
    pub const ALL: [ErrorKind; ERROR_KINDS] =
        [ErrorKind::Io, ErrorKind::Unsupported, ErrorKind::Invalid];

    /// Its name in the metrics (the `kind` label).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Invalid => "invalid",
        }
    }
}

/// One queue's counters. Written only by the poller that serves the queue; read by anyone.
///
/// Aligned to a cache line, so that two queues served by two pollers never share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct QueueMetrics {
    /// Requests started, by [`Op`]: those completed, and those in flight.
    ops: [AtomicU64; OPS],
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    /// Requests failed or refused, by [`ErrorKind`].
    errors: [AtomicU64; ERROR_KINDS],
    /// One latency per completed request.
    latency: AtomicHistogram,
    /// Ticks during which rate limits held the queue's requests in its ring.
    throttled: AtomicU64,
}

impl QueueMetrics {
    /// A request was taken from the ring, parsed, and is about to start.
    #[inline(always)]
    pub fn started(&self, op: Op) {
        bump(&self.ops[op as usize], 1);
    }

    /// A started request completed, `ticks` of `clock` after it started: successfully
    /// (`ok`), having moved `bytes` into the guest's buffers (`reads`) or out of them, or with
    /// an I/O error.
    #[inline(always)]
    pub fn completed(&self, ok: bool, (reads, bytes): (bool, u32), ticks: u64, clock: &Clock) {
        if ok {
            let moved = if reads {
                &self.read_bytes
            } else {
                &self.written_bytes
            };
            bump(moved, u64::from(bytes));
        } else {
            self.failed();
        }
        self.latency.record(ticks, clock);
    }

    /// A started request failed with an I/O error (a rare path: out of line).
    #[cold]
    #[inline(never)]
    fn failed(&self) {
        bump(&self.errors[ErrorKind::Io as usize], 1);
    }

    /// Rate limits held the queue's requests in its ring for `ticks` (once per stretch).
    pub fn throttled(&self, ticks: u64) {
        bump(&self.throttled, ticks);
    }

    /// A request was refused before it started (a rare path: out of line).
    #[cold]
    #[inline(never)]
    pub fn refused(&self, why: ErrorKind) {
        bump(&self.errors[why as usize], 1);
    }

    /// The counters as they are now, latencies in nanoseconds of `clock`, which the poller
    /// recorded them with.
    pub fn read(&self, clock: &Clock) -> Counters {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // Completions first: a request counted as completed was started before, so the starts
        // read afterwards are never behind.
        let latency = self.latency.load(clock);
        let ops = self.ops.each_ref().map(load);
        Counters {
            ops,
            read_bytes: load(&self.read_bytes),
            written_bytes: load(&self.written_bytes),
            errors: self.errors.each_ref().map(load),
            in_flight: ops.iter().sum::<u64>().saturating_sub(latency.count()),
            throttled_ns: clock.nanos(load(&self.throttled)),
            latency,
        }
    }
}

/// The counters of one queue, or a device's summed over its queues.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests started, by [`Op`] ([`Op::ALL`]'s order): those completed (successfully or
    /// not), and those in flight.
    pub ops: [u64; OPS],
    /// Bytes of the reads that succeeded.
    pub read_bytes: u64,
    /// Bytes of the writes that succeeded.
    pub written_bytes: u64,
    /// Requests that failed, by [`ErrorKind`] ([`ErrorKind::ALL`]'s order). A request that
    /// failed with an I/O error is also counted in `ops`; a refused one is not.
    pub errors: [u64; ERROR_KINDS],
    /// Requests started and not completed.
    pub in_flight: u64,
    /// Time, in nanoseconds, during which rate limits held requests in the ring: from the
    /// pass that first found them held back to the one that took requests again.
    pub throttled_ns: u64,
    /// The latency of every completed request, from the pass of the poller that took it from
    /// the ring to the pass that saw it complete (a request that completes at once, like
    /// GET_ID, counts as taking no time).
    pub latency: Histogram,
}

impl Counters {
    /// Requests started of kind `op`.
    pub fn ops_of(&self, op: Op) -> u64 {
        self.ops[op as usize]
    }

    /// Requests that failed for reason `kind`.
    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize]
    }

    /// Adds `other` to these.
    pub fn add(&mut self, other: &Counters) {
        for (a, b) in self.ops.iter_mut().zip(&other.ops) {
            *a = a.wrapping_add(*b);
        }
        self.read_bytes = self.read_bytes.wrapping_add(other.read_bytes);
        self.written_bytes = self.written_bytes.wrapping_add(other.written_bytes);
        for (a, b) in self.errors.iter_mut().zip(&other.errors) {
            *a = a.wrapping_add(*b);
        }
        self.in_flight = self.in_flight.wrapping_add(other.in_flight);
        self.throttled_ns = self.throttled_ns.wrapping_add(other.throttled_ns);
        self.latency.add(&other.latency);
    }
}

/// A device's metrics: one [`QueueMetrics`] per queue a frontend has started.
#[derive(Debug)]
pub struct DeviceMetrics {
    /// By queue index; empty until the queue first starts.
    queues: Box<[OnceLock<Arc<QueueMetrics>>]>,
}

/// A reading of a device's metrics: its totals and each started queue's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStats {
    pub total: Counters,
    /// The queues a frontend has started, with their index, in its order.
    pub queues: Vec<(u16, Counters)>,
}

impl DeviceMetrics {
    /// The metrics of a device of `num_queues` queues, none of which has counters yet.
    pub fn new(num_queues: u16) -> Self {
        Self {
            queues: (0..num_queues).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Queue `index`'s counters, for the poller that serves it: zeroed the first time the
    /// queue starts (when it is attached, never per request), the same ones afterwards.
    pub fn queue(&self, index: u16) -> Option<Arc<QueueMetrics>> {
        let block = self.queues.get(usize::from(index))?;
        Some(block.get_or_init(Arc::default).clone())
    }

    /// Every started queue's counters as they are now, and their sum; `clock` is the pollers'.
    pub fn read(&self, clock: &Clock) -> DeviceStats {
        let queues: Vec<(u16, Counters)> = (0..)
            .zip(self.queues.iter())
            .filter_map(|(i, q)| Some((i, q.get()?.read(clock))))
            .collect();
        let mut total = Counters::default();
        for (_, q) in &queues {
            total.add(q);
        }
        DeviceStats { total, queues }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_sums_its_queues() {
        let clock = Clock::monotonic();
        let m = DeviceMetrics::new(2);
        let (q0, q1) = (m.queue(0).expect("q0"), m.queue(1).expect("q1"));
        assert!(m.queue(2).is_none());
        q0.started(Op::Read);
        q0.completed(true, (true, 4096), 1500, &clock);
        q0.started(Op::Write);
        q0.completed(true, (false, 8192), 3000, &clock);
        q1.started(Op::Read);
        q1.completed(false, (true, 4096), 900, &clock);
        q1.refused(ErrorKind::Unsupported);
        q1.refused(ErrorKind::Invalid);
        q0.started(Op::Flush);
        q1.throttled(700);
        q0.throttled(50);
        let s = m.read(&clock);
        assert_eq!(s.queues.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1]);
        let t = &s.total;
        assert_eq!(t.ops_of(Op::Read), 2);
        assert_eq!(t.ops_of(Op::Write), 1);
        assert_eq!(t.ops_of(Op::Flush), 1, "started, not yet completed");
        assert_eq!(t.read_bytes, 4096, "a failed read moves no bytes");
        assert_eq!(t.written_bytes, 8192);
        assert_eq!(t.errors_of(ErrorKind::Io), 1);
        assert_eq!(t.errors_of(ErrorKind::Unsupported), 1);
        assert_eq!(t.errors_of(ErrorKind::Invalid), 1);
        assert_eq!(t.latency.count(), 3);
        assert_eq!(t.latency.sum_ns, 5400);
        assert_eq!(s.queues[0].1.in_flight, 1, "q0's flush");
        assert_eq!(s.queues[1].1.in_flight, 0, "a refused request never starts");
        assert_eq!(t.in_flight, 1);
        assert_eq!(t.throttled_ns, 750);
    }

    #[test]
    fn only_queues_a_frontend_started_have_counters() {
        let clock = Clock::monotonic();
        let m = DeviceMetrics::new(64);
        assert_eq!(m.read(&clock).queues, [], "none before a queue starts");
        let q5 = m.queue(5).expect("queue 5");
        q5.started(Op::Read);
        let q2 = m.queue(2).expect("queue 2");
        q2.refused(ErrorKind::Invalid);
        assert!(m.queue(64).is_none(), "the device has 64 queues");
        let s = m.read(&clock);
        assert_eq!(s.queues.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 5]);
        assert_eq!(s.total.ops_of(Op::Read), 1);
        // Started again (a reconnection), a queue counts on where it was.
        assert!(Arc::ptr_eq(&q5, &m.queue(5).expect("queue 5 again")));
    }

    #[test]
    fn queue_counters_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<QueueMetrics>(), 64);
        assert_eq!(std::mem::size_of::<QueueMetrics>() % 64, 0);
    }
}
