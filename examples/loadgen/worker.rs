//! One queue's thread: keeps `qd` requests in flight on its libblkio queue, reaps them by
//! busy-polling (poll queues) or by waiting on the completion eventfd, and records each
//! request's latency.

use std::mem::MaybeUninit;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, Errno, ReqFlags};
use clap::ValueEnum;

use super::Error;
use super::hist::Histogram;

/// How long an eventfd-mode wait lasts before the loop looks at the clock again.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// A queue with requests in flight and no completion for this long has stalled.
pub const STALL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

impl Rw {
    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }
}

/// How completions are reaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Poll queues: spin on the used ring, the device never interrupts.
    Poll,
    /// Interrupt queues: sleep on the completion eventfd.
    Eventfd,
}

/// When a queue submits and which completions it counts.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Completions from this instant on are recorded.
    pub measure: Instant,
    /// No submission after this instant.
    pub end: Instant,
    /// No more than this many submissions.
    pub max_ios: u64,
}

/// What one queue thread does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub rw: Rw,
    /// Share of reads in `randrw`, percent.
    pub read_pct: u64,
    pub bs: u64,
    pub qd: usize,
    /// First byte and length of the part of the disk in use (length a multiple of `bs`).
    pub region_start: u64,
    pub region_len: u64,
    /// Where a sequential workload starts, relative to `region_start`.
    pub seq_start: u64,
    pub mode: Mode,
    /// Address of `qd * bs` bytes of a memory region mapped for this device.
    pub buf: usize,
    pub seed: u64,
    pub window: Window,
}

/// What one queue measured.
#[derive(Clone, Debug, Default)]
pub struct QueueStats {
    pub hist: Histogram,
    pub bytes: u64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub first_error: Option<i32>,
    /// Completion time of the last request (count-bounded runs end there).
    pub last: Option<Instant>,
}

/// splitmix64: cheap, and good enough to spread offsets.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Chooses each request's direction and offset, and submits it.
#[derive(Debug)]
struct Submitter {
    rw: Rw,
    read_pct: u64,
    bs: u64,
    blocks: u64,
    region_start: u64,
    cursor: u64,
    buf: usize,
    rng: Rng,
    submitted: u64,
    /// Submission time of the request in each slot (slot = user_data).
    started: Vec<Instant>,
    is_read: Vec<bool>,
}

impl Submitter {
    fn submit(&mut self, q: &mut Blkioq, slot: usize, now: Instant) {
        let block = if self.rw.random() {
            self.rng.next() % self.blocks
        } else {
            let b = self.cursor;
            self.cursor = (self.cursor + 1) % self.blocks;
            b
        };
        let read = match self.rw {
            Rw::Randread | Rw::Read => true,
            Rw::Randwrite | Rw::Write => false,
            Rw::Randrw => self.rng.next() % 100 < self.read_pct,
        };
        let offset = self.region_start + block * self.bs;
        let len = self.bs as usize;
        let buf = (self.buf + slot * len) as *mut u8;
        self.started[slot] = now;
        self.is_read[slot] = read;
        self.submitted += 1;
        // libblkio keeps the pointer until the request completes; the buffer is this slot's
        // part of a region that stays mapped until every queue is dropped.
        if read {
            q.read(offset, buf, len, slot, ReqFlags::empty());
        } else {
            q.write(offset, buf, len, slot, ReqFlags::empty());
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Runs one queue until its window closes and its last request completes.
pub fn run(q: &mut Blkioq, plan: &Plan, go: &Barrier) -> Result<QueueStats, Error> {
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..plan.qd).map(|_| MaybeUninit::uninit()).collect();
    let blocks = plan.region_len / plan.bs;
    let mut sub = Submitter {
        rw: plan.rw,
        read_pct: plan.read_pct,
        bs: plan.bs,
        blocks,
        region_start: plan.region_start,
        cursor: (plan.seq_start / plan.bs) % blocks,
        buf: plan.buf,
        rng: Rng(plan.seed),
        submitted: 0,
        started: vec![Instant::now(); plan.qd],
        is_read: vec![true; plan.qd],
    };
    let mut stats = QueueStats::default();
    let w = plan.window;
    let may_submit = |submitted: u64, now: Instant| submitted < w.max_ios && now < w.end;

    go.wait();
    let now = Instant::now();
    let mut in_flight = 0usize;
    for slot in 0..plan.qd {
        if !may_submit(sub.submitted, now) {
            break;
        }
        sub.submit(q, slot, now);
        in_flight += 1;
    }
    let mut last_progress = now;
    while in_flight > 0 {
        let n = match plan.mode {
            Mode::Poll => {
                q.do_io(&mut completions, 0, None, None)
                    .map_err(|source| Error::Blkio {
                        what: "polling a queue",
                        source,
                    })?
            }
            Mode::Eventfd => {
                let mut timeout = WAIT_SLICE;
                match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
                    Ok(n) => n,
                    Err(e) if e.errno() == Errno::TIME => 0,
                    Err(source) => {
                        return Err(Error::Blkio {
                            what: "waiting for completions",
                            source,
                        });
                    }
                }
            }
        };
        let now = Instant::now();
        if n == 0 {
            if now.duration_since(last_progress) > STALL {
                return Err(Error::Stalled(STALL, in_flight));
            }
            std::hint::spin_loop();
            continue;
        }
        last_progress = now;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` entries of `completions`.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            in_flight -= 1;
            if c.ret != 0 {
                stats.errors += 1;
                stats.first_error.get_or_insert(c.ret);
            } else if now >= w.measure && now <= w.end {
                stats
                    .hist
                    .record(nanos(now.duration_since(sub.started[slot])));
                stats.bytes += plan.bs;
                if sub.is_read[slot] {
                    stats.reads += 1;
                } else {
                    stats.writes += 1;
                }
                stats.last = Some(now);
            }
            if may_submit(sub.submitted, now) {
                sub.submit(q, slot, now);
                in_flight += 1;
            }
        }
    }
    Ok(stats)
}
